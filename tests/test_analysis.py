"""`big_embed.analysis`: metrics.jsonl into series and the evaluation table, Matryoshka curves, neighbours, PCA, and
the evaluation split of a run's config, against hand-written records, plain loops, scikit-learn and the raw data."""

from __future__ import annotations

import json
import math

import ml_collections
import numpy as np
import pytest
from sklearn import decomposition

from big_embed import analysis
from big_embed.data import sources
from big_embed.data.text_corpus import to_str
from big_embed.data.text_records import as_text
from big_embed.errors import ConfigError
from tests import tiny

# Two train records, an evaluation at step 4, then a resumed run that re-logs step 4 and evaluates step 4 again
# (--mode eval) and step 6; a half-written last line.
LINES = [
    {"step": 2, "time": 1.0, "train/loss": 3.0, "train/learning_rate": 0.1},
    {"step": 4, "time": 2.0, "train/loss": 2.0, "train/learning_rate": 0.2},
    {"step": 4, "time": 3.0, "eval/bible/recall@1": 10.0, "eval/bible/recall@1@d8": 4.0, "eval/probe/accuracy": 50.0},
    {"step": 4, "time": 4.0, "train/loss": "nan", "train/learning_rate": 0.2},
    {"step": 4, "time": 5.0, "eval/bible/recall@1": 11.0, "eval/bible/recall@1@d8": 5.0, "eval/probe/accuracy": 51.0},
    {"step": 6, "time": 6.0, "eval/bible/recall@1": 20.0, "eval/bible/recall@1@d8": 8.0},
]


@pytest.fixture
def workdir(tmp_path):
  text = "\n".join(json.dumps(r) for r in LINES) + '\n{"step": 8, "ti'
  (tmp_path / "metrics.jsonl").write_text(text, encoding="utf-8")
  return tmp_path


def test_read_metrics_series_and_names(workdir):
  records = analysis.read_metrics(workdir)
  assert len(records) == len(LINES)  # the truncated last line is left out
  assert math.isnan(records[3]["train/loss"]) and records[0]["train/loss"] == 3.0
  assert analysis.metric_names(records, "train/") == ["train/learning_rate", "train/loss"]
  steps, loss = analysis.series(records, "train/loss")
  assert steps.tolist() == [2, 4] and loss[0] == 3.0 and math.isnan(loss[1])  # step 4: its last record
  steps, lr = analysis.series(records, "train/learning_rate")
  assert steps.tolist() == [2, 4] and lr.tolist() == [0.1, 0.2]
  assert analysis.series(records, "no/such")[0].tolist() == []


def test_read_metrics_errors(tmp_path):
  with pytest.raises(ConfigError, match="metrics.jsonl does not exist"):
    analysis.read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
  with pytest.raises(ConfigError, match="line 2 is not a JSON record"):
    analysis.read_metrics(tmp_path)


def test_eval_table_keeps_the_last_record_of_a_step(workdir):
  table = analysis.eval_table(analysis.read_metrics(workdir))
  assert table.steps.tolist() == [4, 6]
  assert table.columns == ["bible/recall@1", "bible/recall@1@d8", "probe/accuracy"]
  np.testing.assert_array_equal(table.values, [[11.0, 5.0, 51.0], [20.0, 8.0, np.nan]])
  np.testing.assert_array_equal(table.column("bible/recall@1"), [11.0, 20.0])
  assert table.results() == {"bible": {"recall@1": 20.0, "recall@1@d8": 8.0}}
  assert table.results(4) == {"bible": {"recall@1": 11.0, "recall@1@d8": 5.0}, "probe": {"accuracy": 51.0}}
  with pytest.raises(ConfigError, match=r"evaluated steps: \[4, 6\]"):
    table.results(5)
  lines = table.format(digits=1).splitlines()
  assert lines[0].split() == ["step", "bible/recall@1", "bible/recall@1@d8", "probe/accuracy"]
  assert lines[1].split() == ["4", "11.0", "5.0", "51.0"] and lines[2].split() == ["6", "20.0", "8.0"]
  empty = analysis.eval_table(analysis.read_metrics(workdir)[:2])
  assert empty.values.shape == (0, 0)
  with pytest.raises(ConfigError, match="no evaluation record"):
    empty.results()


def test_matryoshka_curves_and_dims():
  results = {"bible": {"recall@1": 0.5, "recall@1@d8": 0.1, "recall@1@d16": 0.3, "mrr@10": 0.6},
             "sts": {"spearman": 0.2}}
  curves = analysis.matryoshka_curves(results, full_dim=32)
  assert list(curves) == ["bible/recall@1"]
  dims, values = curves["bible/recall@1"]
  assert dims.tolist() == [8, 16, 32] and values.tolist() == [0.1, 0.3, 0.5]
  cfg = ml_collections.ConfigDict
  assert analysis.matryoshka_dims(cfg({"name": "matryoshka", "dims": (4, 8), "inner": {"name": "clip"}})) == (4, 8)
  assert analysis.matryoshka_dims(cfg({"name": "hybrid", "mrl_dims": (16, 32)})) == (16, 32)
  assert analysis.matryoshka_dims(cfg({"name": "distill", "inner": {"name": "matryoshka", "dims": (2,)}})) == (2,)
  assert analysis.matryoshka_dims(cfg({"name": "clip", "temperature": 0.07})) == ()


def _naive_neighbours(emb, q, k, exclude_self):
  """Rows by decreasing cosine to row q, ties by lower index, by a Python sort."""
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = [float(e[q] @ e[j]) for j in range(len(e))]
  order = sorted((j for j in range(len(e)) if not (exclude_self and j == q)), key=lambda j: (-cos[j], j))
  return order[:k], [cos[j] for j in order[:k]]


def test_nearest_neighbours_against_a_sort():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(40, 6)).astype(np.float32)
  emb[7] = 3 * emb[3]  # a tie: rows 3 and 7 point the same way
  queries = [0, 3, 7, 39]
  for exclude_self in (True, False):
    idx, sim = analysis.nearest_neighbours(emb, queries, k=5, exclude_self=exclude_self)
    for row, q in enumerate(queries):
      want_idx, want_sim = _naive_neighbours(emb, q, 5, exclude_self)
      assert idx[row].tolist() == want_idx
      np.testing.assert_allclose(sim[row], want_sim, atol=1e-6)
  idx, _ = analysis.nearest_neighbours(emb, [0], k=100)
  assert idx.shape == (1, 39)


def test_prefix_nn_accuracy_against_a_loop():
  """Dimension 0 separates the classes only partly, dimensions 0-1 fully."""
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1, 2], 10)
  emb = np.concatenate([rng.normal(size=(30, 1)), np.eye(3)[labels] * 5 + rng.normal(size=(30, 3)) * 0.1], axis=1)
  got = analysis.prefix_nn_accuracy(emb, labels, (1, 4))
  for value, d in zip(got, (1, 4)):
    hits = [labels[_naive_neighbours(emb[:, :d], i, 1, True)[0][0]] == labels[i] for i in range(30)]
    assert value == pytest.approx(100 * np.mean(hits))
  assert got[1] == 100.0 and got[0] < 80.0
  with pytest.raises(ConfigError, match="5-dim prefix"):
    analysis.prefix_nn_accuracy(emb, labels, (5,))


def test_pca_matches_scikit_learn():
  rng = np.random.default_rng(2)
  emb = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 3.0
  xy, explained = analysis.pca(emb)
  ref = decomposition.PCA(n_components=2, svd_solver="full").fit(emb)
  want = ref.transform(emb)
  for axis in range(2):
    sign = np.sign(xy[:, axis] @ want[:, axis])
    np.testing.assert_allclose(xy[:, axis], sign * want[:, axis], atol=1e-8)
  np.testing.assert_allclose(explained, ref.explained_variance_ratio_, rtol=1e-10)
  again, _ = analysis.pca(emb[::-1])  # the sign rule does not depend on the row order
  np.testing.assert_allclose(again[::-1], xy, atol=1e-8)


def test_label_groups():
  names = ["a", "b", "c", "d"]
  group, group_names = analysis.label_groups(np.array([3, 1, 1, 0, 3, 2, 3]), names, max_groups=3)
  assert group_names == ["b", "d", "other"]  # the two most frequent (3 three times, 1 twice), then the rest
  assert group.tolist() == [1, 0, 0, 2, 1, 2, 1]
  group, group_names = analysis.label_groups(np.array([2, 0, 2]), names, max_groups=3)
  assert group_names == ["a", "c"] and group.tolist() == [1, 0, 1]


# ------------------------------------------------------------------------------------------------
# The evaluation split of a run's config, against the raw records.


def _is_subsequence(rows, of) -> bool:
  """Whether each of `rows` equals a row of `of`, at increasing positions."""
  pos = 0
  for row in rows:
    while pos < len(of) and not np.array_equal(of[pos], row):
      pos += 1
    if pos == len(of):
      return False
    pos += 1
  return True


def test_eval_split_of_an_image_text_run(data_dir):
  cfg = tiny.tiny_config(data_dir)
  full = analysis.eval_split(cfg, max_items=0)  # the labelled zero-shot split is preferred to emoji retrieval
  raw = sources.read_all("fashion_mnist", data_dir, "test")
  assert (full.evaluator, full.modality, full.role, full.texts) == ("fashion_mnist", "image", "doc", [])
  assert full.labels.tolist() == [int(r["label"]) for r in raw]
  assert full.images.shape == (len(raw), 16, 16, 3) and full.images.dtype == np.uint8
  assert len(full.label_names) == 10 and full.describe(0) == full.label_names[int(raw[0]["label"])]
  part = analysis.eval_split(cfg, max_items=50)
  assert len(part) == 50 and _is_subsequence(part.images, full.images)

  emoji = analysis.eval_split(cfg, evaluator="emoji", max_items=0)
  raw = sources.read_all("emoji", data_dir, "test")
  assert emoji.texts == [to_str(r["name"]) for r in raw] and emoji.labels is None
  assert emoji.describe(3) == emoji.texts[3]
  with pytest.raises(ConfigError, match=r"'nope' is not one of the run's evaluators .*\['emoji', 'fashion_mnist'\]"):
    analysis.eval_split(cfg, evaluator="nope")
  cfg.evals = {}  # no evaluator: the test split of a training dataset, the labelled one first
  fallback = analysis.eval_split(cfg, max_items=0)
  assert fallback.evaluator == "fashion_mnist (test split)" and fallback.labels.tolist() == full.labels.tolist()
  cfg.data.mixture = {"emoji": 1.0}
  assert analysis.eval_split(cfg, max_items=0).texts == emoji.texts
  cfg.data.mixture = {}
  with pytest.raises(ConfigError, match="no evaluator of a type whose split can be embedded"):
    analysis.eval_split(cfg)


def test_eval_split_of_a_text_run(text_data_dir):
  cfg = tiny.recipe("text_retrieval", "tiny")
  cfg.data.data_dir = str(text_data_dir)
  retrieval = analysis.eval_split(cfg, max_items=0)  # the recipe's only evaluator: bible retrieval, no labels
  raw = sources.read_all("bible", text_data_dir, "test")
  assert (retrieval.modality, retrieval.role, retrieval.labels) == ("text", "query", None)
  pairs = [(as_text(r["kjv"]), as_text(r["web"])) for r in raw]
  assert list(zip(retrieval.texts, retrieval.pairs)) == [(q, d) for q, d in pairs if q and d]
  part = retrieval.subset(9)
  assert _is_subsequence(list(zip(part.texts, part.pairs)), list(zip(retrieval.texts, retrieval.pairs)))
  cfg.evals.fortunes = dict(type="linear_probe", dataset="fortunes", max_train=10)
  probe = analysis.eval_split(cfg, max_items=0)  # labelled: preferred
  raw = [r for r in sources.read_all("fortunes", text_data_dir, "test") if as_text(r["text"])]
  names = sources.features("fortunes", text_data_dir)["category"].names
  assert probe.evaluator == "fortunes" and probe.texts == [as_text(r["text"]) for r in raw]
  assert [probe.label_names[l] for l in probe.labels] == [names[int(r["category"])] for r in raw]
  part = analysis.eval_split(cfg, max_items=7)
  assert len(part) == 7 and len(part.labels) == 7
  assert _is_subsequence(list(zip(part.texts, part.labels)), list(zip(probe.texts, probe.labels)))
  cfg.evals = {}  # no evaluator: the training task's corpus (bible: retrieval queries)
  assert analysis.eval_split(cfg, max_items=0).texts == retrieval.texts
