"""The metrics behind the image headline numbers (zero-shot top-k, paired retrieval recall@k) against plain loops.

Both break ties by the lower column index, as a stable sort does; the references below walk each row's ranking
sorted by (-score, column).
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
from sklearn import metrics

from big_embed.evaluate import retrieval, zero_shot


def naive_ranking(row):
  """Column indices best first; ties by lower index."""
  return sorted(range(len(row)), key=lambda j: (-row[j], j))


def naive_topk_accuracy(scores, labels, k):
  return float(np.mean([int(y) in naive_ranking(list(row))[:k] for row, y in zip(scores, labels)]))


def naive_paired_recall(scores, k):
  """Percent of queries i whose gallery item i is in the top k of row i."""
  return 100.0 * float(np.mean([naive_ranking(list(row)).index(i) < k for i, row in enumerate(scores)]))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_topk_accuracy_matches_loop(data):
  n, c = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 8))
  scores = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n * c, max_size=n * c)), float).reshape(n, c)
  labels = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
  for k in (1, 2, 5, c + 3):  # c + 3: every class is in the top k
    assert zero_shot.topk_accuracy(scores, labels, k) == pytest.approx(naive_topk_accuracy(scores, labels, k))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_paired_recall_matches_loop(data):
  n = data.draw(st.integers(1, 15))
  scores = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n * n, max_size=n * n)), float).reshape(n, n)
  got = retrieval.paired_recall_at_k(scores, ks=(1, 5, 10, n + 1))
  assert set(got) == {1, 5, 10, n + 1}
  for k, v in got.items():
    assert v == pytest.approx(naive_paired_recall(scores, k))
  # Image -> text and text -> image read the same matrix both ways.
  for k, v in retrieval.paired_recall_at_k(scores.T, ks=(1, 5)).items():
    assert v == pytest.approx(naive_paired_recall(scores.T, k))


def test_topk_accuracy_matches_sklearn_without_ties():
  rng = np.random.default_rng(0)
  scores, labels = rng.standard_normal((50, 7)), rng.integers(0, 7, 50)
  for k in (1, 3, 5):
    want = metrics.top_k_accuracy_score(labels, scores, k=k, labels=np.arange(7))
    assert zero_shot.topk_accuracy(scores, labels, k) == pytest.approx(want)


def test_tie_rule_lower_index_first_in_both():
  # Classes 0 and 1 tie at the top: class 0 ranks first.
  scores = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
  assert zero_shot.topk_accuracy(scores, np.array([0, 1]), 1) == 0.5
  assert zero_shot.topk_accuracy(scores, np.array([0, 1]), 2) == 1.0
  # Query 1's correct item (column 1) ties with column 0, which ranks first; query 0's wins its tie with column 1.
  paired = np.array([[0.5, 0.5, 0.0], [0.9, 0.9, 0.1], [0.2, 0.2, 0.7]])
  assert retrieval.paired_recall_at_k(paired, ks=(1, 2)) == {1: pytest.approx(200 / 3), 2: pytest.approx(100.0)}
  # A collapsed model (every score equal) ranks the gallery 0, 1, 2, ...: chance-like, not perfect.
  n = 20
  assert retrieval.paired_recall_at_k(np.zeros((n, n)), ks=(1, 5)) == {1: pytest.approx(100 / n),
                                                                        5: pytest.approx(500 / n)}
  labels = np.arange(10) % 4
  assert zero_shot.topk_accuracy(np.zeros((10, 4)), labels, 1) == pytest.approx(np.mean(labels == 0))


def test_errors():
  with pytest.raises(ValueError, match="square"):
    retrieval.paired_recall_at_k(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="k >= 1"):
    zero_shot.topk_accuracy(np.zeros((2, 3)), np.array([0, 1]), 0)


class _Encoder:
  """Stand-in text tower: each prompt's embedding is a fixed random vector, unit norm, seeded by its token ids."""

  def texts(self, params, tokens):
    assert params == "params"
    out = np.stack([np.random.default_rng(list(t)).standard_normal(6) for t in tokens])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


class _Tokenizer:

  def encode_batch(self, texts, max_len):
    return np.array([[ord(ch) for ch in t.ljust(max_len)[:max_len]] for t in texts])


def test_class_embeddings_ensemble_prompts():
  names, templates = ["cat", "dog", "car"], ["a {}.", "the {}!"]
  got = zero_shot.class_embeddings(_Encoder(), "params", _Tokenizer(), names, templates, 12)
  assert got.shape == (3, 6)
  for name, row in zip(names, got):
    prompts = [t.format(name) for t in templates]
    emb = _Encoder().texts("params", _Tokenizer().encode_batch(prompts, 12))
    mean = emb.mean(axis=0)
    np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-6)
