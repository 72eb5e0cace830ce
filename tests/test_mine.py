"""Hard-negative mining: exact top-k against brute force, and the false-negative filters against a naive loop."""

import numpy as np
import pytest

from big_embed import mine


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("n_queries,block", [(7, 256), (300, 64)])
def test_exact_top_k_matches_brute_force(n_queries, block):
  rng = np.random.default_rng(0)
  q, c = _unit(rng, n_queries, 16), _unit(rng, 123, 16)
  scores, index = mine.exact_top_k(q, c, 10, block=block)
  sims = q @ c.T
  want = np.argsort(-sims, axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(index, want)
  np.testing.assert_allclose(scores, np.take_along_axis(sims, want, axis=1), atol=1e-5)


def test_exact_top_k_caps_k_at_corpus_size():
  rng = np.random.default_rng(1)
  scores, index = mine.exact_top_k(_unit(rng, 3, 8), _unit(rng, 4, 8), 50)
  assert scores.shape == index.shape == (3, 4)


def _naive_filter(scores, docs, pos_doc, pos_score, h, margin_abs, margin_rel):
  negs = np.full((len(docs), h), -1)
  for i in range(len(docs)):
    kept = [d for s, d in zip(scores[i], docs[i])
            if d != pos_doc[i] and s < margin_abs and s <= margin_rel * pos_score[i]]
    negs[i, :len(kept[:h])] = kept[:h]
  return negs


def test_filter_negatives_matches_naive_loop():
  rng = np.random.default_rng(2)
  q, c = _unit(rng, 40, 6), _unit(rng, 60, 6)
  c[:5] = c[5:10] * 0.999 + 0.001  # near-duplicates: above the absolute margin
  c /= np.linalg.norm(c, axis=1, keepdims=True)
  pos = rng.integers(0, 60, size=40)
  scores, docs = mine.exact_top_k(q, c, 20)
  pos_score = np.einsum("qd,qd->q", q, c[pos])
  got, got_scores, stats = mine.filter_negatives(scores, docs, pos, pos_score, num_negatives=5,
                                                 margin_abs=0.9, margin_rel=0.95)
  np.testing.assert_array_equal(got, _naive_filter(scores, docs, pos, pos_score, 5, 0.9, 0.95))
  sims = q @ c.T
  for i, j in zip(*np.nonzero(got >= 0)):
    assert got_scores[i, j] == pytest.approx(sims[i, got[i, j]], abs=1e-5)
    assert got[i, j] != pos[i] and sims[i, got[i, j]] <= 0.95 * pos_score[i] + 1e-6
  assert stats["short_rows"] == int((got[:, -1] < 0).sum())
