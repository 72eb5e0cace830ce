"""Tests of the multi-task text pipeline (text_tasks, text_stream, text_batches, mined_negatives, text_records) on a
tiny TFDS dataset, registered as a corpus and built in a temp directory.

Expected batches come from a naive reference: the records read back with `sources.open_split`, turned into
texts by hand and encoded with the tokenizer; every batch row must be one of them.
"""

import hashlib
import json
import math
import pathlib
import pickle
import re

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from big_embed import config_schema, config_utils
from big_embed.data import DataError, corpora, sources, text_records, text_stream, text_tasks
from big_embed.data import mined_negatives as mn
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.errors import ConfigError

DATASET = "tiny_text"
N_TRAIN, N_TEST = 120, 24
MAX_LEN = 12
QP, DP = "query: ", "passage: "
LABEL_NAMES = ["noun.animal", "verb.motion", "game::strategy", "adj.all", "t_shirt", "noun.food"]
LABEL_TEXTS = ["noun animal", "verb motion", "game strategy", "adj all", "t shirt", "noun food"]  # by hand
TAG_NAMES = ["role::devel", "use::gaming", "x11::app", "game::puzzle", "interface::commandline",
             "scope::utility", "works_with::text", "devel::lang.python", "admin::boot", "suite::debian"]
TAG_TEXTS = ["role devel", "use gaming", "x11 app", "game puzzle", "interface commandline", "scope utility",
             "works with text", "devel lang python", "admin boot", "suite debian"]
WORDS = ["river", "stone", "apple", "cloud", "forest", "engine", "violin", "garden", "pencil", "ladder",
         "silver", "candle", "harbor", "meadow", "rocket", "saddle", "thunder", "walnut", "zephyr", "yarn"]


def _record(i: int, split: str) -> dict:
  """Record i of a split; some needed fields are empty (or the score NaN) on purpose."""
  w = lambda j: WORDS[j % len(WORDS)]  # pylint: disable=unnecessary-lambda-assignment
  tags = sorted({i % 10, (3 * i + 1) % 10}) if i % 9 != 4 else []
  return {
      "query": "" if i % 11 == 5 else f"{w(i)} {w(3 * i)} {split} {i}",
      "doc": "" if i % 13 == 7 else f"about the {w(i % 23)} and the {w(i % 7 + 5)}",  # repeats: equal docs
      "lemmas": [] if i % 10 == 9 else [f"{w(i)}{i}", "", w(i + 1)],
      "text": "" if i % 19 == 2 else f"text {i} of {w(2 * i)}",
      "label": i % len(LABEL_NAMES),
      "topic": ["red", "green", "blue", ""][i % 4],
      "tags": tags,
      "cats": [w(i % 5), w(i % 3 + 10)] if i % 8 != 1 else [],
      "text_a": "" if i % 17 == 3 else f"first {w(i)} {i}",
      "text_b": f"second {w(i + 2)} {i}",
      "score": float("nan") if i % 23 == 6 else (i % 5) / 4,
  }


class TinyTextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Test-only builder with every kind of field the text tasks read."""

  name = "tiny_text_tasks"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "query": tfds.features.Text(), "doc": tfds.features.Text(),
        "lemmas": tfds.features.Sequence(tfds.features.Text()), "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=LABEL_NAMES), "topic": tfds.features.Text(),
        "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=TAG_NAMES)),
        "cats": tfds.features.Sequence(tfds.features.Text()),
        "text_a": tfds.features.Text(), "text_b": tfds.features.Text(),
        "score": tfds.features.Scalar(np.float32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", N_TRAIN), "test": self._generate_examples("test", N_TEST)}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield i, _record(i, split)


CORPUS = corpora.Corpus(
    name=DATASET, builder=TinyTextBuilder, kind="text",
    fields={"query": "text", "doc": "text", "lemmas": "text_seq", "text": "text", "label": "class", "topic": "text",
            "tags": "class_seq", "cats": "text_seq", "text_a": "text", "text_b": "text", "score": "float"})


@pytest.fixture(scope="module")
def registered():
  """The tiny corpus in the registry, for this module's tests."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(corpora.registry._CORPORA, DATASET, CORPUS)  # pylint: disable=protected-access
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, registered):  # pylint: disable=unused-argument
  directory = tmp_path_factory.mktemp("text_data")
  sources.make_builder(DATASET, directory).download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return directory


@pytest.fixture(scope="module")
def records(data_dir):
  src = sources.open_split(DATASET, data_dir, "train")
  return src.__getitems__(range(len(src)))


@pytest.fixture(scope="module")
def tok(records):
  texts = [QP, DP, *LABEL_TEXTS, *TAG_TEXTS, *WORDS, "red green blue"]
  for r in records:
    texts += [v.decode() for k, v in r.items() if isinstance(v, bytes)]
  return tokenizer_lib.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def mined(records, data_dir):
  """A mined set for the retrieval task with lemmas as queries: 5 candidates per record, some unusable."""
  n = len(records)
  rng = np.random.default_rng(0)
  neg = rng.integers(0, n, size=(n, 5))
  neg[::4, 0] = -1
  neg[1::5, 1] = np.arange(1, n, 5)  # the row itself
  neg[::7, 4] = -1
  mn.write_mined_negatives(mn.mined_dir(data_dir, "lemma_negs"), source_dataset=DATASET, split="train",
                           query_field="lemmas", doc_field="doc", negatives=neg,
                           scores=rng.random((n, 5)).astype(np.float32), meta={"model": "test"})
  return neg


def _text(v) -> str:
  """Naive reference: Text -> str; Sequence(Text) -> non-empty items joined with ", "."""
  if isinstance(v, bytes):
    return v.decode().strip()
  return ", ".join(x.decode().strip() for x in v if x.decode().strip())


def _task(**kw):
  return config_utils.text_task(dataset=DATASET, **kw)


ALL_TASKS = {
    "ret": dict(type="retrieval", batch_size=8),
    "ret_neg": dict(type="retrieval", batch_size=8, num_negatives=3, mined="lemma_negs",
                    fields={"query": "lemmas"}, weight=2.0),
    "sts": dict(type="sts", batch_size=8, weight=0.5),
    "cls": dict(type="classification", batch_size=8, num_negatives=2),
    "cls_topic": dict(type="classification", batch_size=4, fields={"label": "topic"}),
    "ml": dict(type="multilabel", batch_size=8, fields={"label": "tags"}),
    "ml_cats": dict(type="multilabel", batch_size=8, fields={"label": "cats", "text": "query"}),
}


def _config(data_dir, tasks=None):
  cfg = ml_collections.ConfigDict(dict(data_dir=str(data_dir), num_threads=2, prefetch_buffer_size=4,
                                       worker_count=0))
  cfg.tasks = {name: _task(**kw) for name, kw in (ALL_TASKS if tasks is None else tasks).items()}
  return cfg


def _make(data_dir, tok, tasks=None, *, seed=0, process_index=0, process_count=1, batch=8):
  """The stream of `tasks` (validated as the run does, with one mesh shard)."""
  cfg = _config(data_dir, tasks)
  specs = text_tasks.validate_tasks(cfg, batch, 1, process_count)
  return text_stream.make_text_train_dataset(specs, cfg, tok, max_text_len=MAX_LEN, query_prefix=QP, doc_prefix=DP,
                                             seed=seed, process_index=process_index, process_count=process_count)


def _task_names(tasks, seed, steps):
  """The task name of each step (the schedule of the tasks, sorted by name as the stream orders them)."""
  tasks = ALL_TASKS if tasks is None else tasks
  names = sorted(tasks)
  schedule = text_stream.TaskSchedule([tasks[n].get("weight", 1.0) for n in names], text_stream.schedule_seed(seed))
  return [names[schedule(s)[0]] for s in range(steps)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _take_named(data_dir, tok, tasks=None, n=1, **kw):
  """(task name, batch) of the first n steps; the yielded task type must be the named task's."""
  steps = _take(iter(_make(data_dir, tok, tasks, **kw)), n)
  names = _task_names(tasks, kw.get("seed", 0), n)
  for name, (task_type, _) in zip(names, steps):
    assert task_type == (ALL_TASKS if tasks is None else tasks)[name]["type"]
  return [(name, batch) for name, (_, batch) in zip(names, steps)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for (name_a, batch_a), (name_b, batch_b) in zip(a, b):
    assert name_a == name_b and batch_a.keys() == batch_b.keys()
    for k in batch_a:
      assert batch_a[k].dtype == batch_b[k].dtype
      np.testing.assert_array_equal(batch_a[k], batch_b[k])


class Reference:
  """Naive expected rows of each task, keyed by the encoded query row."""

  def __init__(self, records, tok):
    self.records, self.tok = records, tok
    self.enc = lambda texts: tok.encode_batch(list(texts), MAX_LEN)  # pylint: disable=unnecessary-lambda-assignment

  def rows_by_query(self, query_field, needed):
    """query row bytes -> record index, over records whose `needed` fields are non-empty."""
    out = {}
    for i, r in enumerate(self.records):
      if all(_text(r[f]) if f != "score" else not math.isnan(r[f]) for f in needed):
        key = self.enc([QP + _text(r[query_field])])[0].tobytes()
        assert key not in out  # queries are unique, so a row identifies its record
        out[key] = i
    return out


def _check_batch(name, batch, ref, mined_neg, local_batch):
  """Asserts that `batch` is a correct batch of task `name`; returns the record indices of its rows."""
  spec = ALL_TASKS[name]
  recs, enc = ref.records, ref.enc
  want_keys = {
      "retrieval": {"query", "key", "ids"} | ({"hard_negatives", "hard_negative_valid"}
                                              if spec.get("num_negatives") else set()),
      "sts": {"query", "key", "score"},
      "classification": {"query", "key", "hard_negatives", "hard_negative_valid", "ids"},
      "multilabel": {"query", "label", "positive_ids", "all_positive_ids", "label_ids", "label_valid"},
  }[spec["type"]]
  assert set(batch) == want_keys, name
  b = local_batch
  for k in ("query", "key", "label"):
    if k in batch:
      assert batch[k].shape == (b, MAX_LEN) and batch[k].dtype == np.int32
      assert (batch[k][:, 0] != 0).all()  # never an empty text
  fields = {**{"query": "query", "doc": "doc", "text": "text", "label": "label"}, **spec.get("fields", {})}
  typ = spec["type"]
  if typ == "retrieval":
    lookup = ref.rows_by_query(fields["query"], [fields["query"], "doc"])
  elif typ == "sts":
    lookup = ref.rows_by_query("text_a", ["text_a", "text_b", "score"])
  else:
    lookup = ref.rows_by_query(fields["text"], [fields["text"]])
  rows = np.array([lookup[q.tobytes()] for q in batch["query"]])
  if typ == "retrieval":
    docs = [_text(recs[r]["doc"]) for r in rows]
    np.testing.assert_array_equal(batch["key"], enc([DP + d for d in docs]))
    assert batch["ids"].dtype == np.int32 and batch["ids"].shape == (b,)
    for i in range(b):
      for j in range(b):
        assert (batch["ids"][i] == batch["ids"][j]) == (docs[i] == docs[j])
    if "hard_negatives" in batch:
      h = spec["num_negatives"]
      assert batch["hard_negatives"].shape == (b, h, MAX_LEN) and batch["hard_negative_valid"].shape == (b, h)
      for i, r in enumerate(rows):
        usable = {_text(recs[c]["doc"]) for c in mined_neg[r] if c >= 0} - {""} - set(docs)  # distinct texts
        allowed = {enc([DP + d])[0].tobytes() for d in usable}
        valid = batch["hard_negative_valid"][i]
        assert valid.sum() == min(h, len(usable)) and valid[:valid.sum()].all()
        got = [batch["hard_negatives"][i, j].tobytes() for j in range(h) if valid[j]]
        assert set(got) <= allowed and len(set(got)) == len(got)
        assert not batch["hard_negatives"][i][~valid].any()  # padding: all-pad rows
  elif typ == "sts":
    np.testing.assert_array_equal(batch["key"], enc([DP + _text(recs[r]["text_b"]) for r in rows]))
    np.testing.assert_array_equal(batch["score"], np.array([recs[r]["score"] for r in rows], np.float32))
    assert batch["score"].dtype == np.float32
  elif typ == "classification":
    if fields["label"] == "topic":
      names = ["blue", "green", "red"]  # sorted label texts of the split
      y = np.array([names.index(_text(recs[r]["topic"])) for r in rows])
    else:
      names, y = LABEL_TEXTS, np.array([recs[r]["label"] for r in rows])
    label_rows = enc([DP + t for t in names])
    np.testing.assert_array_equal(batch["ids"], y)
    np.testing.assert_array_equal(batch["key"], label_rows[y])
    h = spec.get("num_negatives") or len(names) - 1
    assert batch["hard_negatives"].shape == (b, h, MAX_LEN) and batch["hard_negative_valid"].all()
    for i in range(b):
      got = [next(c for c in range(len(names)) if (label_rows[c] == row).all()) for row in batch["hard_negatives"][i]]
      assert len(set(got)) == h and y[i] not in got
  else:
    if fields["label"] == "tags":
      names, per_row = TAG_TEXTS, [sorted(int(t) for t in recs[r]["tags"]) for r in rows]
    else:
      names = sorted({_text([c]) for rec in recs for c in rec["cats"]})
      per_row = [sorted(names.index(_text([c])) for c in recs[r]["cats"]) for r in rows]
    label_rows = enc([DP + t for t in names])
    assert all(per_row)  # records without labels are skipped
    np.testing.assert_array_equal(batch["positive_ids"][:, 0], batch["label_ids"])
    np.testing.assert_array_equal(batch["label"], label_rows[batch["label_ids"]])
    for i in range(b):
      assert batch["label_ids"][i] in per_row[i]
      allp = batch["all_positive_ids"][i]
      assert sorted(allp[allp >= 0]) == per_row[i] and (allp[len(per_row[i]):] == -1).all()
    for k in ("positive_ids", "all_positive_ids", "label_ids"):
      assert batch[k].dtype == np.int32
  return rows


# Contents.

def test_every_batch_is_one_correct_task(data_dir, tok, records, mined):
  ref = Reference(records, tok)
  seen = set()
  for name, batch in _take_named(data_dir, tok, n=150):
    local = ALL_TASKS[name]["batch_size"]
    _check_batch(name, batch, ref, mined, local)
    if ALL_TASKS[name]["type"] == "multilabel":  # one process: the first occurrence of each id is valid
      ids = list(batch["label_ids"])
      np.testing.assert_array_equal(batch["label_valid"], [ids.index(x) == i for i, x in enumerate(ids)])
    seen.add(name)
  assert seen == set(ALL_TASKS)


def test_epoch_visits_each_usable_record_once(data_dir, tok, records):
  ref = Reference(records, tok)
  lookup = ref.rows_by_query("query", ["query", "doc"])
  it = iter(_make(data_dir, tok, {"ret": ALL_TASKS["ret"]}))
  per_epoch = len(lookup) // 8
  rows = [lookup[q.tobytes()] for _, b in _take(it, per_epoch) for q in b["query"]]
  assert len(rows) == len(set(rows)) == per_epoch * 8
  later = [lookup[q.tobytes()] for _, b in _take(it, per_epoch) for q in b["query"]]
  assert later != rows  # the next epoch is reshuffled


def test_mixture_proportions(data_dir, tok):
  tasks = {"ret": dict(type="retrieval", batch_size=2, weight=1.0),
           "sts": dict(type="sts", batch_size=2, weight=3.0),
           "cls": dict(type="classification", batch_size=2, weight=0.5, num_negatives=1)}
  steps = 2000
  types = [task_type for task_type, _ in _take(iter(_make(data_dir, tok, tasks)), steps)]  # one task per type
  total = sum(t["weight"] for t in tasks.values())
  for t in tasks.values():
    p = t["weight"] / total
    sigma = math.sqrt(steps * p * (1 - p))
    assert abs(types.count(t["type"]) - steps * p) < 4 * sigma, (t, types.count(t["type"]), steps * p)


# Exact resume.

def test_schedule_ranks_across_blocks_and_random_access():
  weights, steps = [1.0, 2.0, 0.5], 2 * text_stream.SCHEDULE_BLOCK + 100
  schedule = text_stream.TaskSchedule(weights, seed=7)
  got = [schedule(s) for s in range(steps)]
  counts = [0, 0, 0]
  for t, k in got:  # naive: k = how many earlier steps had task t
    assert k == counts[t]
    counts[t] += 1
  jumped = text_stream.TaskSchedule(weights, seed=7)
  block = text_stream.SCHEDULE_BLOCK
  for s in (steps - 1, 5, block, steps - 2, block - 1):  # a resumed run starts anywhere
    assert jumped(s) == got[s]
  other = text_stream.TaskSchedule(weights, seed=8)
  assert [t for t, _ in got] != [other(s)[0] for s in range(steps)]


def test_set_state_resumes_exactly(data_dir, tok):
  it = iter(_make(data_dir, tok))
  _take(it, 9)
  state = it.get_state()
  json.dumps(state)  # JSON-serialisable
  expected = _take(it, 12)
  fresh = iter(_make(data_dir, tok))
  fresh.set_state(state)
  _assert_same(_take(fresh, 12), expected)
  other_seed = iter(_make(data_dir, tok, seed=1))
  other_seed.set_state(state)
  assert [n for n, _ in _take(other_seed, 12)] != [n for n, _ in expected]


def test_grain_checkpoint_roundtrip(data_dir, tok, tmp_path):
  it = iter(_make(data_dir, tok))
  _take(it, 5)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",),
                                  options=ocp.CheckpointManagerOptions(create=True))
  manager.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = _take(it, 10)
  fresh = iter(_make(data_dir, tok))
  manager.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same(_take(fresh, 10), expected)
  manager.close()


def test_pickled_dataset_gives_the_same_stream(data_dir, tok):
  ds = _make(data_dir, tok)
  _assert_same(_take(iter(pickle.loads(pickle.dumps(ds))), 8), _take(iter(ds), 8))


# Several processes.

def test_two_processes_share_tasks_and_split_records(data_dir, tok, records, mined):
  ref = Reference(records, tok)
  tasks = {k: ALL_TASKS[k] for k in ("ret", "sts", "ml", "ml_cats", "cls")}
  streams = [_take_named(data_dir, tok, tasks, 80, process_index=p, process_count=2) for p in range(2)]
  seen = [{name: set() for name in tasks} for _ in range(2)]
  for (name0, b0), (name1, b1) in zip(*streams):
    assert name0 == name1
    local = tasks[name0]["batch_size"] // 2
    for p, batch in enumerate((b0, b1)):
      seen[p][name0].update(_check_batch(name0, batch, ref, mined, local))
    if tasks[name0]["type"] == "multilabel":  # each label id valid once in the global pool (p0 rows, p1 rows)
      ids = list(b0["label_ids"]) + list(b1["label_ids"])
      valid = np.concatenate([b0["label_valid"], b1["label_valid"]])
      np.testing.assert_array_equal(valid, [ids.index(x) == i for i, x in enumerate(ids)])
  for name in tasks:
    assert seen[0][name] and seen[1][name]
    assert not seen[0][name] & seen[1][name], name


# Mined hard negatives.

def test_mined_negatives_roundtrip_and_overwrite(tmp_path):
  neg = np.array([[1, -1, 2], [0, 2, -1], [-1, -1, -1]])
  scores = np.array([[0.9, np.nan, 0.5], [0.7, 0.6, np.nan], [np.nan] * 3], np.float32)
  directory = tmp_path / "mined" / "x"
  mn.write_mined_negatives(directory, source_dataset="d", split="train", query_field="q", doc_field="t",
                           negatives=neg, scores=scores, meta={"model": "m", "k": 3})
  got = mn.read_mined_negatives(directory)
  np.testing.assert_array_equal(got.negatives, neg)
  assert got.negatives.dtype == np.int64 and got.scores.dtype == np.float32
  np.testing.assert_array_equal(got.scores, scores)
  assert got.info["meta"] == {"model": "m", "k": 3} and got.info["num_records"] == 3
  assert got.info["source_dataset"] == "d" and got.info["doc_field"] == "t"
  mn.write_mined_negatives(directory, source_dataset="d", split="train", query_field="q", doc_field="t",
                           negatives=neg[:, :1], scores=scores[:, :1], meta={})
  assert mn.read_mined_negatives(directory).negatives.shape == (3, 1)
  assert sorted(p.name for p in directory.parent.iterdir()) == ["x"]  # no temporary leftovers
  with pytest.raises(ValueError, match="record indices"):
    mn.write_mined_negatives(directory, source_dataset="d", split="train", query_field="q", doc_field="t",
                             negatives=neg + 5, scores=scores, meta={})
  with pytest.raises(DataError, match="No mined hard-negative set"):
    mn.read_mined_negatives(tmp_path / "mined" / "missing")


@pytest.mark.parametrize("change, match", [
    (dict(split="test"), "split is 'test'"),
    (dict(source_dataset="other"), "source_dataset is 'other'"),
    (dict(query_field="query"), "query_field is 'query'"),
    (dict(rows=50), "num_records is 50"),
    (dict(h=2), "num_negatives is 2"),
])
def test_mined_set_must_match_the_task(data_dir, tok, tmp_path, change, match):
  change = dict(change)
  n, h = change.pop("rows", N_TRAIN), change.pop("h", 4)
  args = {**dict(source_dataset=DATASET, split="train", query_field="lemmas", doc_field="doc"), **change}
  mn.write_mined_negatives(mn.mined_dir(data_dir, "bad"), negatives=np.zeros((n, h), np.int64),
                           scores=np.zeros((n, h), np.float32), meta={"command": "mine --flags"}, **args)
  tasks = {"r": dict(type="retrieval", num_negatives=3, mined="bad", fields={"query": "lemmas"}, batch_size=4)}
  with pytest.raises(DataError, match=match) as e:
    _make(data_dir, tok, tasks)
  assert "Re-mine with" in str(e.value) and "mine --flags" in str(e.value)


def test_missing_mined_set(data_dir, tok):
  tasks = {"r": dict(type="retrieval", num_negatives=1, mined="nothing_here")}
  with pytest.raises(DataError, match="No mined hard-negative set"):
    _make(data_dir, tok, tasks)


# Errors.

def test_missing_dataset_names_the_prepare_command(tmp_path, tok, registered):  # pylint: disable=unused-argument
  with pytest.raises(DataError, match=f"python -m big_embed.data.prepare {DATASET} --data_dir {tmp_path}"):
    _make(tmp_path, tok, {"ret": ALL_TASKS["ret"]})


def test_too_few_records_for_the_batch(data_dir, tok):
  with pytest.raises(ConfigError, match="fewer than the process-local batch of 512"):
    _make(data_dir, tok, {"ret": dict(type="retrieval", batch_size=1024)}, process_count=2)


def _validate(data_dir, tasks, *, batch=8, shards=4, processes=2):
  return text_tasks.validate_tasks(_config(data_dir, tasks), batch, shards, processes)


def test_validate_accepts_good_configs(data_dir):
  specs = _validate(data_dir, {k: ALL_TASKS[k] for k in ("ret", "ret_neg", "sts", "cls", "cls_topic")},
                    shards=4, processes=1)
  assert list(specs) == sorted(specs) and specs["sts"].fields == {"text_a": "text_a", "text_b": "text_b",
                                                                    "score": "score"}
  assert specs["ret_neg"] == text_tasks.TaskSpec(
      name="ret_neg", type="retrieval", dataset=DATASET, split="train", weight=2.0, batch_size=8,
      fields={"query": "lemmas", "doc": "doc"}, num_negatives=3, mined="lemma_negs", max_records=0)
  assert _validate(data_dir, {"ml": ALL_TASKS["ml"]})["ml"].batch_size == 8
  assert _validate(data_dir, {"s": dict(type="sts", batch_size=0)}, batch=16)["s"].batch_size == 16


@pytest.mark.parametrize("tasks, match", [
    ({}, "config.data.tasks is empty"),
    ({"a": dict(type="ranking")}, r"type='ranking' is unknown"),
    ({"a": dict(type="retrieval", weight=0.0)}, "weight must be a finite number > 0"),
    ({"a": dict(type="retrieval", weight=-1.0)}, "weight must be a finite number > 0"),
    ({"a": dict(type="retrieval", batch_size=6)}, "not divisible by the 4 data-parallel"),
    ({"a": dict(type="retrieval", batch_size=-4)}, "batch_size must be > 0"),
    ({"a": dict(type="retrieval", split="validation")}, r"split='validation' is not a split of .*train, test"),
    ({"a": dict(type="retrieval", fields={"doc": "body"})}, "has no such field"),
    ({"a": dict(type="sts", fields={"score": "text"})}, "sts score must be one of: float"),
    ({"a": dict(type="classification", fields={"label": "tags"})}, "classification label"),
    ({"a": dict(type="classification", num_negatives=6)}, "exceeds the 5 other labels"),
    ({"a": dict(type="retrieval", num_negatives=2)}, "needs a mined hard-negative set"),
    ({"a": dict(type="sts", mined="x")}, "only retrieval tasks read mined"),
    ({"a": dict(type="multilabel", num_negatives=1, fields={"label": "tags"})}, "take no hard negatives"),
    ({"a": dict(type="retrieval", max_records=-1)}, "max_records must be >= 0"),
])
def test_validate_rejects(data_dir, tasks, match):
  with pytest.raises(ConfigError, match=match):
    _validate(data_dir, tasks)


def test_validate_needs_the_prepared_dataset(tmp_path, registered):  # pylint: disable=unused-argument
  with pytest.raises(DataError, match=re.escape(f"Build it with: python -m big_embed.data.prepare {DATASET} "
                                                f"--data_dir {tmp_path}")):
    _validate(tmp_path, {"a": dict(type="retrieval")})


def test_validate_rejects_structure_errors(data_dir):
  with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
    _validate(data_dir, {"a": dict(type="retrieval", batch_size=8)}, shards=1, processes=3)
  cfg = _config(data_dir, {"a": dict(type="retrieval")})
  cfg.tasks.a.dataset = "no_such_data"
  with pytest.raises(ConfigError, match="'no_such_data' is not a known text corpus"):
    text_tasks.validate_tasks(cfg, 8, 1, 1)
  cfg.tasks.a.dataset = "emoji"
  with pytest.raises(ConfigError, match="'emoji' is not a known text corpus"):
    text_tasks.validate_tasks(cfg, 8, 1, 1)
  cfg.tasks.a = ml_collections.ConfigDict({"type": "retrieval", "dataset": DATASET, "wieght": 2.0})
  with pytest.raises(ConfigError, match=r"unknown field\(s\) \['wieght'\]"):
    text_tasks.validate_tasks(cfg, 8, 1, 1)
  with pytest.raises(ConfigError, match="no field"):
    config_utils.text_task(wieght=2.0)
  with pytest.raises(ConfigError, match="no role"):
    config_utils.text_task(fields={"answer": "x"})


def test_every_task_type_has_its_roles():
  assert set(text_tasks.TYPE_ROLES) == set(config_schema.TASK_TYPES)
  assert {r for roles in text_tasks.TYPE_ROLES.values() for r in roles} == set(config_schema.TASK_ROLES)


def test_no_loss_name_in_the_data_layer():
  """The data layer knows task types, never losses: no registered loss name appears in big_embed/data/."""
  from big_embed import losses  # pylint: disable=g-import-not-at-top
  names = set(losses.names())
  assert {"clip", "hybrid", "dexml", "infonce"} <= names
  root = pathlib.Path(text_tasks.__file__).parent
  words = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b", re.IGNORECASE)
  found = [f"{path.relative_to(root)}:{i}: {m.group(0)}" for path in sorted(root.rglob("*.py"))
           for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
           for m in words.finditer(line)]
  assert not found, found


def test_label_text_rule():
  assert [text_records.humanize_label(n) for n in LABEL_NAMES] == LABEL_TEXTS
  assert [text_records.humanize_label(n) for n in TAG_NAMES] == TAG_TEXTS


def test_text_id_is_a_stable_int32():
  assert text_records.text_id("river") == int.from_bytes(hashlib.sha1(b"river").digest()[:4], "big") & 0x7FFFFFFF
  assert 0 <= text_records.text_id("x") < 2**31
