"""Text evaluators on tiny in-memory datasets with a deterministic bag-of-words embedder."""

import re
import types
import zlib

import ml_collections
import numpy as np
import pytest
from scipy import stats

from big_embed.data import sources
from big_embed.evaluate import registry
from big_embed.evaluate import text_evals  # noqa: F401  (registers the text eval types)
from big_embed.evaluate import text_metrics as tm
from tests.test_text_metrics import naive_metrics, naive_msd, naive_precision, naive_retrieval

DIM = 64


def bow(text: str, dim: int = DIM) -> np.ndarray:
  """Bag of words: the sum of a fixed random vector per word (seeded by the word's hash), L2-normalised."""
  v = np.zeros(dim, np.float64)
  for w in re.findall(r"[a-z0-9]+", text.lower()):
    v += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(dim)
  return (v / max(np.linalg.norm(v), 1e-12)).astype(np.float32)


class FakeEncoder:
  """`encode_texts` stand-in that records every call (texts, role, desc)."""

  def __init__(self):
    self.calls = []

  def __call__(self, params, texts, role="doc", desc=None):
    assert params == "params"
    assert role in ("query", "doc")
    self.calls.append((list(texts), role, desc))
    return np.stack([bow(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)

  def texts_for(self, role):
    return [t for texts, r, _ in self.calls if r == role for t in texts]


def text(s: str) -> bytes:
  return s.encode("utf-8")


def texts(*items: str) -> np.ndarray:
  return np.array([text(s) for s in items], dtype=object)


@pytest.fixture
def fake_data(monkeypatch):
  """Installs {(dataset, split): records} and {dataset: {field: names}} as the prepared datasets."""
  tables, label_names = {}, {}

  def open_split(name, data_dir, split):
    assert data_dir == "/data"
    return list(tables[(name, split)])

  def features(name, data_dir):
    assert data_dir == "/data"
    return {f: types.SimpleNamespace(feature=types.SimpleNamespace(names=n)) for f, n in label_names[name].items()}

  monkeypatch.setattr(sources, "open_split", open_split)
  monkeypatch.setattr(sources, "features", features)
  return tables, label_names


def make(settings: dict):
  enc = FakeEncoder()
  ctx = types.SimpleNamespace(encode_texts=enc, data_dir="/data")
  evals = registry.build_evaluators(ml_collections.ConfigDict({"e": settings}), ctx)
  return evals["e"], enc


def prefix(emb, d):
  e = emb[:, :d]
  return e / np.linalg.norm(e, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------------
# STS.

STS_PAIRS = [("cat", "dog", 7.0), ("cat", "cat feline", 9.5), ("car", "automobile car", 9.0),
             ("bank river", "money bank", 3.0), ("sun", "moon star", 2.0), ("dog", "dog puppy young", 8.0)]


def test_sts_matches_scipy(fake_data):
  tables, _ = fake_data
  tables[("wordsim353", "test")] = [{"text_a": text(a), "text_b": text(b), "score": np.float32(s)}
                                    for a, b, s in STS_PAIRS]
  ev, enc = make({"type": "sts", "dataset": "wordsim353", "dims": (8, 16)})
  got = ev.run("params")
  a = np.stack([bow(p[0]) for p in STS_PAIRS])
  b = np.stack([bow(p[1]) for p in STS_PAIRS])
  gold = [p[2] for p in STS_PAIRS]
  cos = np.sum(a * b, axis=1)
  assert got["spearman"] == pytest.approx(stats.spearmanr(cos, gold).statistic)
  assert got["pearson"] == pytest.approx(stats.pearsonr(cos, gold).statistic)
  for d in (8, 16):
    cos_d = np.sum(prefix(a, d) * prefix(b, d), axis=1)
    assert got[f"spearman@d{d}"] == pytest.approx(stats.spearmanr(cos_d, gold).statistic)
    assert got[f"pearson@d{d}"] == pytest.approx(stats.pearsonr(cos_d, gold).statistic)
  assert set(got) == {"spearman", "pearson", "spearman@d8", "pearson@d8", "spearman@d16", "pearson@d16"}
  # Every distinct text once, as a document, with a progress-bar description.
  encoded = enc.texts_for("doc")
  assert sorted(encoded) == sorted({t for p in STS_PAIRS for t in p[:2]})
  assert not enc.texts_for("query") and all(desc for _, _, desc in enc.calls)


def test_sts_dims_wider_than_embedding(fake_data):
  tables, _ = fake_data
  tables[("lee50", "test")] = [{"text_a": text(a), "text_b": text(b), "score": np.float32(s)}
                               for a, b, s in STS_PAIRS]
  ev, _ = make({"type": "sts", "dataset": "lee50", "dims": (DIM * 2,)})
  with pytest.raises(ValueError, match="128-dim prefix"):
    ev.run("params")


# ----------------------------------------------------------------------------------------------------------------
# Text retrieval.

VERSES = [  # (kjv, web); verses 2 and 5 share a WEB text, verse 6 has no WEB text
    ("in the beginning god created heaven", "in the beginning god created the heavens"),
    ("and the earth was without form", "the earth was formless and empty"),
    ("let there be light", "let there be light"),
    ("and god saw the light that it was good", "god saw the light and saw that it was good"),
    ("and god divided the light from darkness", "god divided the light from the darkness"),
    ("let there be light said god", "let there be light"),
    ("the evening and the morning", ""),
]


def _bible(tables):
  tables[("bible", "test")] = [{"id": text(f"Gen.1.{i + 1}"), "book": text("Gen"), "kjv": text(k), "web": text(w)}
                               for i, (k, w) in enumerate(VERSES)]


def test_text_retrieval_matches_brute_force(fake_data):
  tables, _ = fake_data
  _bible(tables)
  ev, enc = make({"type": "text_retrieval", "dataset": "bible", "msd_mode": "sorted", "dims": (16,)})
  got = ev.run("params")
  kept = VERSES[:6]  # the empty WEB text is skipped
  corpus = list(dict.fromkeys(w for _, w in kept))  # distinct, in first-occurrence order
  assert len(corpus) == 5  # the duplicated WEB verse is one document
  assert enc.texts_for("doc") == corpus
  assert sorted(enc.texts_for("query")) == sorted(k for k, _ in kept)
  q = np.stack([bow(k) for k, _ in kept])
  d = np.stack([bow(w) for w in corpus])
  positives = [corpus.index(w) for _, w in kept]
  for suffix, (qq, dd) in (("", (q, d)), ("@d16", (prefix(q, 16), prefix(d, 16)))):
    sim = qq @ dd.T
    rel = [{p} for p in positives]
    r1 = naive_retrieval(sim, rel, 1)[0]
    r10, mrr, ndcg = naive_retrieval(sim, rel, 10)
    assert got["recall@1" + suffix] == pytest.approx(r1)
    assert got["recall@10" + suffix] == pytest.approx(r10)
    assert got["mrr@10" + suffix] == pytest.approx(mrr)
    assert got["ndcg@10" + suffix] == pytest.approx(ndcg)
    assert got["msd" + suffix] == pytest.approx(naive_msd(sim, positives, list(range(len(corpus))), "sorted")[0])
  assert got["recall@10"] == 1.0  # 5 documents: every positive is in the top 10


def test_text_retrieval_exact_matches_rank_first(fake_data):
  tables, _ = fake_data
  # Each query is its document's text: the query's own document has cosine 1 and distinct texts differ.
  tables[("foldoc", "test")] = [
      {"term": text(t), "definition": text(t), "categories": texts("x")}
      for t in ("alpha beta", "gamma delta", "epsilon zeta eta", "theta", "iota kappa")]
  ev, _ = make({"type": "text_retrieval", "dataset": "foldoc", "msd_mode": "release"})
  got = ev.run("params")
  assert got["recall@1"] == got["mrr@10"] == got["ndcg@10"] == 1.0
  emb = np.stack([bow(t) for t in ("alpha beta", "gamma delta", "epsilon zeta eta", "theta", "iota kappa")])
  assert got["msd"] == pytest.approx(naive_msd(emb @ emb.T, list(range(5)), list(range(5)), "release")[0])


def test_text_retrieval_wordnet_lemmas_joined_and_max_queries(fake_data):
  tables, _ = fake_data
  defs = [("a domesticated carnivorous mammal", ["dog", "domestic_dog"]),
          ("feline mammal usually having thick soft fur", ["cat", "true_cat"]),
          ("a financial institution", ["bank"]),
          ("sloping land beside a body of water", ["bank"]),
          ("a motor vehicle with four wheels", ["car", "auto", "automobile"])]
  tables[("wordnet", "test")] = [{"id": text(f"n.{i}"), "lemmas": texts(*lem), "definition": text(dfn),
                                  "examples": texts(), "lexname": np.int64(0)} for i, (dfn, lem) in enumerate(defs)]
  ev, enc = make({"type": "text_retrieval", "dataset": "wordnet", "max_queries": 3})
  assert not enc.calls  # nothing is encoded before run()
  ev.run("params")
  assert sorted(enc.texts_for("doc")) == sorted(["dog, domestic_dog", "cat, true_cat", "bank",
                                                 "car, auto, automobile"])
  queries = enc.texts_for("query")
  assert len(queries) == 3 and set(queries) <= {d for d, _ in defs}
  ev2, enc2 = make({"type": "text_retrieval", "dataset": "wordnet", "max_queries": 3})
  ev2.run("params")
  assert sorted(enc2.texts_for("query")) == sorted(queries)  # the same subset every time
  # The two "bank" senses share one document: both queries count it as their positive.
  assert ev.corpus.count("bank") == 1


# ----------------------------------------------------------------------------------------------------------------
# Linear probe.

def test_linear_probe_on_separable_texts(fake_data):
  tables, _ = fake_data
  train = [("program code bug computer", 0), ("computer program software", 0), ("code bug crash", 0),
           ("love heart kiss", 1), ("my heart love", 1), ("kiss love", 1),
           ("cat dog mat", 2), ("dog barked cat", 2), ("cat bird dog", 2)]
  test = [("a bug in the program", 0), ("full of love", 1), ("the dog", 2), ("heart", 1)]
  tables[("fortunes", "train")] = [{"text": text(t), "category": np.int64(c)} for t, c in train]
  tables[("fortunes", "test")] = [{"text": text(t), "category": np.int64(c)} for t, c in test]
  ev, enc = make({"type": "linear_probe", "dataset": "fortunes", "steps": 300, "dims": (32,)})
  got = ev.run("params")
  assert set(got) == {"accuracy", "accuracy@d32"}
  assert got["accuracy"] == 1.0
  assert not enc.texts_for("doc")
  assert sorted(enc.texts_for("query")) == sorted(t for t, _ in train + test)


def test_linear_probe_caps_and_label_field_check(fake_data):
  tables, _ = fake_data
  recs = [{"package": text(f"p{i}"), "summary": text(f"word{i % 3} thing{i}"), "description": text(""),
           "section": np.int64(i % 3), "tags": np.array([], np.int64)} for i in range(20)]
  tables[("debian_packages", "train")] = recs
  tables[("debian_packages", "test")] = recs[:10]
  ev, _ = make({"type": "linear_probe", "dataset": "debian_packages", "max_train": 7, "max_test": 4, "steps": 10})
  assert len(ev.train_texts) == 7 and len(ev.test_texts) == 4
  assert [int(t[4]) for t in ev.train_texts] == ev.train_labels.tolist()  # texts and labels stay paired
  assert [int(t[4]) for t in ev.test_texts] == ev.test_labels.tolist()
  train = np.stack([bow(t) for t in ev.train_texts])
  test = np.stack([bow(t) for t in ev.test_texts])
  num_classes = int(max(ev.train_labels.max(), ev.test_labels.max())) + 1
  want = tm.linear_probe_accuracy(train, ev.train_labels, test, ev.test_labels, num_classes=num_classes, steps=10)
  assert ev.run("params")["accuracy"] == want
  with pytest.raises(ValueError, match="label_field='tags'"):
    make({"type": "linear_probe", "dataset": "debian_packages", "label_field": "tags"})


# ----------------------------------------------------------------------------------------------------------------
# Multi-label.

TAGS = ["game::strategy", "game::puzzle", "use::editing", "works-with::text", "implemented-in::c",
        "role::program_x"]


def test_multilabel_matches_brute_force(fake_data):
  tables, label_names = fake_data
  label_names["debian_packages"] = {"tags": TAGS}
  pkgs = [("a strategy game with armies", [0, 5]), ("puzzle game of falling blocks", [1, 5]),
          ("text editing program", [2, 3, 5]), ("no tags here", []), ("a compiler written in c", [4])]
  tables[("debian_packages", "test")] = [
      {"package": text(f"p{i}"), "summary": text("s"), "description": text(d), "section": np.int64(0),
       "tags": np.array(t, np.int64)} for i, (d, t) in enumerate(pkgs)]
  ev, enc = make({"type": "multilabel", "dataset": "debian_packages", "dims": (32,)})
  got = ev.run("params")
  label_texts = ["game strategy", "game puzzle", "use editing", "works-with text", "implemented-in c",
                 "role program x"]
  assert sorted(enc.texts_for("doc")) == sorted(label_texts)
  kept = [p for p in pkgs if p[1]]
  assert sorted(enc.texts_for("query")) == sorted(d for d, _ in kept)
  q = np.stack([bow(d) for d, _ in kept])
  lab = np.stack([bow(t) for t in label_texts])
  labels = [t for _, t in kept]
  for suffix, (qq, ll) in (("", (q, lab)), ("@d32", (prefix(q, 32), prefix(lab, 32)))):
    scores = qq @ ll.T
    assert got["p@1" + suffix] == pytest.approx(naive_precision(scores, labels, 1))
    assert got["p@5" + suffix] == pytest.approx(naive_precision(scores, labels, 5))

    at5, full = naive_metrics(scores, labels, 5), naive_metrics(scores, labels, None)
    assert got["recall@5" + suffix] == pytest.approx(at5["recall"])
    assert got["hit_rate@5" + suffix] == pytest.approx(at5["hit"])
    assert got["ndcg@5" + suffix] == pytest.approx(at5["ndcg"])
    assert got["map" + suffix] == pytest.approx(full["ap"])

# ----------------------------------------------------------------------------------------------------------------
# Settings.


@pytest.mark.parametrize("settings,field", [
    ({"type": "sts", "dataset": "wordsim353", "splitt": "test"}, "splitt"),
    ({"type": "sts", "dataset": "stsb"}, "dataset"),
    ({"type": "sts", "dataset": "lee50", "dims": (0,)}, "dims"),
    ({"type": "text_retrieval", "dataset": "bible", "doc_field": "nkjv"}, "doc_field"),
    ({"type": "text_retrieval", "dataset": "bible", "msd_mode": "paper"}, "msd_mode"),
    ({"type": "text_retrieval", "dataset": "bible", "max_queries": -1}, "max_queries"),
    ({"type": "linear_probe", "dataset": "fortunes", "learning_rate": 0.0}, "learning_rate"),
    ({"type": "multilabel", "dataset": "wordnet"}, "dataset"),
])
def test_bad_settings_name_the_field(fake_data, settings, field):
  with pytest.raises(ValueError, match=field):
    make(settings)
