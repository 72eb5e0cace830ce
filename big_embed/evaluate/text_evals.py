"""Text-embedding evaluators: STS correlation, text retrieval, linear probe, multi-label tagging.

Each reads a prepared text dataset with `sources.read_all` and embeds texts with the context's
`encode_texts(params, texts, role, desc=None) -> float32 [N, D]` (role "query" or "doc"). Every evaluator accepts
`dims` (a tuple of prefix widths, empty = off): its metrics are then also reported as "<metric>@d<dim>", computed on
the first <dim> embedding dimensions re-normalised (a Matryoshka curve).

Which corpora an evaluator reads, and its default fields, are the corpus registry's (`big_embed.data.corpora`:
each corpus's `sts`, `retrieval`, `probe` and `multilabel` entries; e.g. retrieval on wordnet defaults to
definition -> lemmas), and the datasets found in the data dir have theirs from their roles (`data.found_datasets`:
e.g. query -> positive). Settings (config.evals.<name>, besides `type`):
  sts:            dataset (an STS corpus: lee50, wordsim353, simlex999), split="test", dims=()
                  -> spearman, pearson of the cosine similarity of text_a / text_b (both role "doc") with score.
  text_retrieval: dataset (bible, wordnet, debian_packages, foldoc, ...), query_field, doc_field (any text field;
                  "" = the corpus's defaults), split="test", max_queries=0 (all), max_docs=0 (all; else the queries'
                  documents plus a fixed sample of the others), msd_mode="" ("" off | sorted | release), dims=()
                  -> recall@1, recall@10, mrr@10, ndcg@10 [, msd].
  linear_probe:   dataset (fortunes, wordnet, debian_packages, ...), text_field, label_field (a ClassLabel field;
                  "" = the corpus's defaults), train_split="train", test_split="test", max_train=0, max_test=0 (all),
                  steps=500, learning_rate=0.01, weight_decay=1e-4, dims=() -> accuracy.
  multilabel:     dataset (debian_packages, ...), text_field, label_field (a Sequence(ClassLabel) field; "" = the
                  corpus's defaults: description, tags), split="test", max_queries=0, dims=()
                  -> p@1, p@5, recall@5 (the share of a row's labels in its top 5), hit_rate@5 (some label in the
                  top 5), map (mean average precision), ndcg@5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import numpy as np

from big_embed.data import corpora, sources
from big_embed.data.text_records import as_text, humanize_label
from big_embed.evaluate import registry
from big_embed.evaluate import text_metrics as tm

SUBSET_SEED = 0  # max_queries / max_train / max_test pick the same records every time
_QUERY_CHUNK = 1024  # retrieval query rows scored at once: bounds memory to _QUERY_CHUNK x corpus size


# ----------------------------------------------------------------------------------------------------------------
# Settings.


class _Settings:
  """Checked settings of one evaluator: unknown keys and bad values raise ValueError naming the field."""

  def __init__(self, settings, type_name: str, defaults: dict[str, Any]):
    self.type_name = type_name
    given = dict(settings.items()) if hasattr(settings, "items") else dict(settings)
    given.pop("type", None)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(f"{type_name} eval: unknown setting(s) {unknown}; known: {sorted(defaults)}")
    self.values = {k: given.get(k, v) for k, v in defaults.items()}

  def fail(self, field: str, problem: str):
    raise ValueError(f"{self.type_name} eval setting {field}={self.values[field]!r}: {problem}")

  def choice(self, field: str, options: Sequence[str]) -> str:
    v = self.values[field]
    if v not in options:
      self.fail(field, f"must be one of {list(options)}")
    return v

  def string(self, field: str) -> str:
    v = self.values[field]
    if not isinstance(v, str) or not v:
      self.fail(field, "must be a non-empty string")
    return v

  def count(self, field: str, minimum: int = 0) -> int:
    v = self.values[field]
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
      self.fail(field, f"must be an integer >= {minimum}" + (" (0 = all)" if minimum == 0 else ""))
    return int(v)

  def number(self, field: str, positive: bool) -> float:
    v = self.values[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 or (positive and v == 0):
      self.fail(field, "must be a " + ("positive" if positive else "non-negative") + " number")
    return float(v)

  def dims(self) -> tuple[int, ...]:
    v = self.values["dims"]
    if v is None:
      return ()
    if isinstance(v, (int, str)) or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                                            for d in v):
      self.fail("dims", "must be a tuple of positive prefix widths, e.g. (64, 128, 256); () = off")
    return tuple(int(d) for d in v)


def _corpus(s: _Settings, evaluator: str, data_dir: str) -> corpora.Corpus:
  """The `dataset` setting's corpus (registered, or found in `data_dir`), one whose registry entry gives defaults
  for `evaluator` ("sts", ...)."""
  readable = [c.name for c in sources.entries("text", data_dir) if getattr(c, evaluator) is not None]
  return sources.corpus(s.choice("dataset", readable), data_dir)


def _fields(s: _Settings, corpus: corpora.Corpus, evaluator: str, names: tuple[str, ...],
            kinds: tuple[tuple[str, ...], ...]) -> list[str]:
  """Fills empty field settings with the corpus's `evaluator` defaults and checks each is one of its fields of the
  given kinds."""
  out = []
  for name, default, allowed in zip(names, getattr(corpus, evaluator), kinds):
    if s.values[name] in ("", None):
      s.values[name] = default
    out.append(s.choice(name, corpus.fields_of(*allowed)))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Reading and embedding.


def _field(record: dict[str, Any], field: str, dataset: str):
  if field not in record:
    raise ValueError(f"dataset {dataset!r} records have no field {field!r} (fields: {sorted(record)})")
  return record[field]


def _subset(n: int, cap: int) -> np.ndarray:
  """All of range(n), or `cap` of them chosen with a fixed seed (in increasing order)."""
  if not cap or cap >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:cap])


def _normalise(emb: np.ndarray, dim: int | None = None) -> np.ndarray:
  """Rows of emb[:, :dim], L2-normalised (float32)."""
  if dim is not None:
    if dim > emb.shape[1]:
      raise ValueError(f"dims asks for a {dim}-dim prefix but the embeddings have {emb.shape[1]} dims")
    emb = emb[:, :dim]
  emb = np.asarray(emb, np.float32)
  return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _unique(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(distinct texts in first-occurrence order, [len(texts)] int64 index of each text among them)."""
  index: dict[str, int] = {}
  inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), np.int64, len(texts))
  return list(index), inverse


def _encode(ctx, params, texts: list[str], role: str, desc: str) -> np.ndarray:
  emb = np.asarray(ctx.encode_texts(params, texts, role, desc=desc), np.float32)
  if emb.ndim != 2 or len(emb) != len(texts):
    raise ValueError(f"encode_texts returned shape {emb.shape} for {len(texts)} texts; expected [N, D]")
  return emb


def _embed_unique(ctx, params, texts: Sequence[str], role: str, desc: str) -> np.ndarray:
  """Embeds each distinct text once; returns float32 [len(texts), D] in input order."""
  unique, inverse = _unique(texts)
  return _encode(ctx, params, unique, role, desc)[inverse]


def _curve(metrics_fn: Callable[[int | None], dict[str, float]], dims: tuple[int, ...]) -> dict[str, float]:
  """metrics_fn(None) (full width), plus metrics_fn(d) for each prefix width d with keys "<metric>@d<d>"."""
  out = dict(metrics_fn(None))
  for d in dims:
    out.update({f"{k}@d{d}": v for k, v in metrics_fn(d).items()})
  return out


# ----------------------------------------------------------------------------------------------------------------
# Evaluators.


@registry.register("sts")
class STS:
  """Semantic textual similarity: Spearman / Pearson correlation of cosine(text_a, text_b) with the gold score."""

  def __init__(self, settings, ctx):
    s = _Settings(settings, "sts", {"dataset": "", "split": "test", "dims": ()})
    corpus = _corpus(s, "sts", ctx.data_dir)
    self.dataset, self.split, self.dims = corpus.name, s.string("split"), s.dims()
    self.ctx = ctx
    records = sources.read_all(self.dataset, ctx.data_dir, self.split)
    if len(records) < 2:
      raise ValueError(f"sts: {self.dataset}/{self.split} has {len(records)} pairs; need at least 2")
    a_field, b_field, score_field = corpus.sts
    self.text_a = [as_text(_field(r, a_field, self.dataset)) for r in records]
    self.text_b = [as_text(_field(r, b_field, self.dataset)) for r in records]
    self.scores = np.asarray([float(_field(r, score_field, self.dataset)) for r in records], np.float64)  # [P]

  def run(self, params) -> dict[str, float]:
    emb = _embed_unique(self.ctx, params, self.text_a + self.text_b, "doc", f"sts {self.dataset}")  # [2P, D]
    p = len(self.text_a)

    def metrics(dim):
      e = _normalise(emb, dim)
      cos = np.sum(e[:p].astype(np.float64) * e[p:], axis=1)  # [P]
      return {"spearman": tm.spearman(cos, self.scores), "pearson": tm.pearson(cos, self.scores)}

    return _curve(metrics, self.dims)


@registry.register("text_retrieval")
class TextRetrieval:
  """Query text -> its document among all distinct document texts of the split.

  Records whose query or document text is empty are skipped. The corpus is the distinct document texts of the
  remaining records (in first-occurrence order, which breaks score ties); a query's relevant document is the one
  equal to its own record's document text.
  """

  def __init__(self, settings, ctx):
    s = _Settings(settings, "text_retrieval", {
        "dataset": "", "query_field": "", "doc_field": "", "split": "test", "max_queries": 0, "max_docs": 0,
        "msd_mode": "", "dims": ()})
    corpus = _corpus(s, "retrieval", ctx.data_dir)
    self.dataset = corpus.name
    query_field, doc_field = _fields(s, corpus, "retrieval", ("query_field", "doc_field"), (corpora.TEXT_KINDS,) * 2)
    self.split, self.dims = s.string("split"), s.dims()
    max_queries, max_docs = s.count("max_queries"), s.count("max_docs")
    self.msd_mode = s.choice("msd_mode", ("",) + tm.MSD_MODES)
    self.ctx = ctx
    queries, docs = [], []
    for r in sources.read_all(self.dataset, ctx.data_dir, self.split):
      q, d = as_text(_field(r, query_field, self.dataset)), as_text(_field(r, doc_field, self.dataset))
      if q and d:
        queries.append(q)
        docs.append(d)
    if not queries:
      raise ValueError(f"text_retrieval: {self.dataset}/{self.split} has no record with both a {query_field!r} "
                       f"and a {doc_field!r} text")
    corpus, positive = _unique(docs)  # [N] distinct document texts, in first-occurrence order
    keep = _subset(len(queries), max_queries)
    self.queries = [queries[i] for i in keep]  # [Q]
    positive = positive[keep]  # [Q] corpus index of each query's document
    if max_docs and max_docs < len(corpus):  # the queries' documents plus a fixed sample of the others
      needed = np.unique(positive)
      others = np.setdiff1d(np.arange(len(corpus)), needed)
      extra = others[_subset(len(others), max(0, max_docs - len(needed)))]
      chosen = np.sort(np.concatenate([needed, extra]))
      slot = np.full(len(corpus), -1, np.int64)
      slot[chosen] = np.arange(len(chosen))
      corpus, positive = [corpus[i] for i in chosen], slot[positive]
    self.corpus, self.positive = corpus, positive
    self.desc = f"text retrieval {self.dataset}"

  def run(self, params) -> dict[str, float]:
    q_emb = _embed_unique(self.ctx, params, self.queries, "query", f"{self.desc} queries")
    d_emb = _encode(self.ctx, params, self.corpus, "doc", f"{self.desc} corpus")
    gallery_ids = np.arange(len(self.corpus))
    relevant = [np.array([p]) for p in self.positive]

    def metrics(dim):
      q, d = _normalise(q_emb, dim), _normalise(d_emb, dim)
      ranks, sd, num_rel = [], [], []
      for start in range(0, len(q), _QUERY_CHUNK):
        sim = q[start:start + _QUERY_CHUNK] @ d.T  # [chunk, N]
        ranks += tm.relevant_ranks(sim, relevant[start:start + _QUERY_CHUNK])
        if self.msd_mode:
          s, r = tm.msd_per_query(sim, self.positive[start:start + _QUERY_CHUNK], gallery_ids, self.msd_mode)
          sd.append(s)
          num_rel.append(r)
      out = {"recall@1": tm.recall_from_ranks(ranks, 1), "recall@10": tm.recall_from_ranks(ranks, 10),
             "mrr@10": tm.mrr_from_ranks(ranks, 10), "ndcg@10": tm.ndcg_from_ranks(ranks, 10)}
      if self.msd_mode:
        res = tm.msd_summary(np.concatenate(sd), np.concatenate(num_rel), len(self.corpus))
        if res.dropped_no_relevant or res.dropped_all_relevant:
          logging.warning("%s: mSD dropped %d queries with no relevant and %d with only relevant documents",
                          self.desc, res.dropped_no_relevant, res.dropped_all_relevant)
        out["msd"] = res.msd
      return out

    return _curve(metrics, self.dims)


def _class_names(feature) -> list[str]:
  """Names of a ClassLabel feature, or of the ClassLabel inside a Sequence feature."""
  names = getattr(feature, "names", None)
  if names is None:
    names = getattr(getattr(feature, "feature", None), "names", None)
  if names is None:
    raise ValueError(f"feature {feature!r} is not a ClassLabel (or a Sequence of one)")
  return list(names)


@registry.register("linear_probe")
class LinearProbe:
  """Logistic-regression probe on frozen text embeddings (role "query"): trained on one split, tested on another."""

  def __init__(self, settings, ctx):
    s = _Settings(settings, "linear_probe", {
        "dataset": "", "text_field": "", "label_field": "", "train_split": "train", "test_split": "test",
        "max_train": 0, "max_test": 0, "steps": 500, "learning_rate": 1e-2, "weight_decay": 1e-4, "dims": ()})
    corpus = _corpus(s, "probe", ctx.data_dir)
    self.dataset = corpus.name
    self.text_field, self.label_field = _fields(s, corpus, "probe", ("text_field", "label_field"),
                                                (corpora.TEXT_KINDS, ("class",)))
    train_split, test_split = s.string("train_split"), s.string("test_split")
    max_train, max_test = s.count("max_train"), s.count("max_test")
    self.steps = s.count("steps", minimum=1)
    self.learning_rate = s.number("learning_rate", positive=True)
    self.weight_decay = s.number("weight_decay", positive=False)
    self.dims = s.dims()
    self.ctx = ctx
    self.train_texts, self.train_labels = self._load(train_split, max_train)
    self.test_texts, self.test_labels = self._load(test_split, max_test)
    self.desc = f"linear probe {self.dataset}"

  def _load(self, split: str, cap: int) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for r in sources.read_all(self.dataset, self.ctx.data_dir, split):
      t = as_text(_field(r, self.text_field, self.dataset))
      label = np.asarray(_field(r, self.label_field, self.dataset))
      if label.ndim:
        raise ValueError(f"linear_probe: {self.dataset} field {self.label_field!r} is not a single class label")
      if t:
        texts.append(t)
        labels.append(int(label))
    if not texts:
      raise ValueError(f"linear_probe: {self.dataset}/{split} has no record with a {self.text_field!r} text")
    keep = _subset(len(texts), cap)
    return [texts[i] for i in keep], np.asarray(labels, np.int64)[keep]

  def run(self, params) -> dict[str, float]:
    train = _embed_unique(self.ctx, params, self.train_texts, "query", f"{self.desc} train")
    test = _embed_unique(self.ctx, params, self.test_texts, "query", f"{self.desc} test")
    num_classes = int(max(self.train_labels.max(), self.test_labels.max())) + 1

    def metrics(dim):
      acc = tm.linear_probe_accuracy(_normalise(train, dim), self.train_labels, _normalise(test, dim),
                                     self.test_labels, num_classes=num_classes, steps=self.steps,
                                     learning_rate=self.learning_rate, weight_decay=self.weight_decay)
      return {"accuracy": acc}

    return _curve(metrics, self.dims)


@registry.register("multilabel")
class MultiLabel:
  """Tag retrieval: rank every label's text (role "doc") for each query text (role "query"); precision@1 / @5.

  Records without a label are skipped; labels are the names of the dataset's Sequence(ClassLabel) field, made
  readable by `text_records.humanize_label`.
  """

  def __init__(self, settings, ctx):
    s = _Settings(settings, "multilabel", {
        "dataset": "debian_packages", "text_field": "", "label_field": "", "split": "test", "max_queries": 0,
        "dims": ()})
    corpus = _corpus(s, "multilabel", ctx.data_dir)
    self.dataset = corpus.name
    text_field, label_field = _fields(s, corpus, "multilabel", ("text_field", "label_field"),
                                      (corpora.TEXT_KINDS, ("class_seq",)))
    split, max_queries, self.dims = s.string("split"), s.count("max_queries"), s.dims()
    self.ctx = ctx
    names = _class_names(sources.features(self.dataset, ctx.data_dir)[label_field])
    if len(names) < 5:
      raise ValueError(f"multilabel: {self.dataset} field {label_field!r} has {len(names)} labels; p@5 needs 5")
    self.label_texts = [humanize_label(n) for n in names]  # [L]
    texts, labels = [], []
    for r in sources.read_all(self.dataset, ctx.data_dir, split):
      t = as_text(_field(r, text_field, self.dataset))
      ids = np.asarray(_field(r, label_field, self.dataset), np.int64).reshape(-1)
      if t and len(ids):
        texts.append(t)
        labels.append(ids)
    if not texts:
      raise ValueError(f"multilabel: {self.dataset}/{split} has no record with a {text_field!r} text and labels")
    keep = _subset(len(texts), max_queries)
    self.texts = [texts[i] for i in keep]  # [Q]
    self.labels = [labels[i] for i in keep]  # Q arrays of label ids
    self.desc = f"multilabel {self.dataset}"

  def run(self, params) -> dict[str, float]:
    q_emb = _embed_unique(self.ctx, params, self.texts, "query", f"{self.desc} queries")
    l_emb = _embed_unique(self.ctx, params, self.label_texts, "doc", f"{self.desc} labels")

    def metrics(dim):
      scores = _normalise(q_emb, dim) @ _normalise(l_emb, dim).T  # [Q, L]
      ranks = tm.relevant_ranks(scores, self.labels)
      return {"p@1": tm.precision_at_k(scores, self.labels, 1), "p@5": tm.precision_at_k(scores, self.labels, 5),
              "recall@5": tm.recall_from_ranks(ranks, 5), "hit_rate@5": tm.hit_rate_from_ranks(ranks, 5),
              "map": tm.map_from_ranks(ranks), "ndcg@5": tm.ndcg_from_ranks(ranks, 5)}

    return _curve(metrics, self.dims)
