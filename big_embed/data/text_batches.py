"""The batches of each text task type: a task's usable records in memory, its per-process record order, and the
batch built from record indices.

A task's records are a Grain MapDataset over its usable record indices, sharded `process_index::process_count`,
shuffled (a new permutation every epoch), repeated and batched at the process-local batch size
B = task batch_size // process_count; batch k of a process is a pure function of (seed, task, process, k).

Batches (numpy, L = max_text_len):
  retrieval:      query, key int32 [B, L]; ids int32 [B] (`text_records.text_id` of the document text, so equal
                  documents are not each other's negatives); with num_negatives = H > 0 also hard_negatives int32
                  [B, H, L] and hard_negative_valid bool [B, H] (from a mined set, or the records' own negatives).
                  With teacher_embeddings (a store of D-wide rows): teacher_query, teacher_key float32 [B, D] (the
                  rows' query and document embeddings) and, with H > 0, teacher_hard_negatives float32 [B, H, D]
                  (each mined negative record's document embedding; zeros where hard_negative_valid is False).
  sts:            query, key int32 [B, L] (text_a, text_b); score float32 [B].
  classification: query int32 [B, L] (the text), key int32 [B, L] (its label's text), hard_negatives int32
                  [B, H, L] (H other label texts, sampled without replacement), hard_negative_valid bool [B, H]
                  (all True), ids int32 [B] (the label id).
  multilabel:     query int32 [B, L]; label int32 [B, L] (one positive label text sampled per row: the batch's
                  label pool); positive_ids int32 [B, 1]; all_positive_ids int32 [B, P] (-1 padded, P = the most
                  labels of any record of the task); label_ids int32 [B]; label_valid bool [B].
Padding slots (hard_negative_valid False) hold all-pad rows (token 0 only).

Texts: the query prefix is put before queries and text_a, the document prefix before documents, text_b, label
texts and hard negatives (`text_records` says how fields become texts and labels become label texts). Records with
an empty needed field (or a NaN score, or no label) are not usable.

Multilabel label_valid: False for a label id already in the GLOBAL pool at an earlier position (processes in order,
rows in order). Every process recomputes the other processes' sampled labels for the step (record indices and
positive draws are cheap pure functions), so each label id is valid exactly once in the global pool, whatever the
number of processes.

Retrieval hard negatives come from a mined set (`mined_negatives`: row i lists record indices of the same split,
-1 = none, whose documents are the candidates) or from the task's "negatives" field (record i's own negative texts,
`Corpus.negatives`). Per step and row, H of the row's usable candidates are sampled without replacement; a candidate
is unusable when it is -1, a record whose document is empty, or a text equal (same id) to a positive of the
process-local batch (or to an earlier candidate of the row). Rows with fewer usable candidates are padded
(hard_negative_valid False).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from big_embed.data import mined_negatives, seeds, teacher_embeddings, text_records, text_tasks
from big_embed.data.errors import DataError
from big_embed.data.text_tasks import TaskSpec
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError


class TaskBatches:
  """One task: its usable records in memory, its per-process index streams and its batch builder."""

  def __init__(self, spec: TaskSpec, *, tokenizer: Tokenizer, max_len: int, query_prefix: str, doc_prefix: str,
               seed: int, process_count: int, usable: np.ndarray):
    self.spec = spec
    self.name = spec.name
    self._tok = tokenizer
    self._max_len = max_len
    self._qp, self._dp = query_prefix, doc_prefix
    self._seed = seeds.derive(seed, "task", spec.name)
    self._process_count = process_count
    self.local_batch = spec.batch_size // process_count
    if spec.max_records:
      usable = usable[usable < spec.max_records]
    self.usable = usable  # int64 [N_usable] record indices
    per_process = len(usable) // process_count
    if per_process < self.local_batch:
      raise ConfigError(f"Task {spec.name!r}: {spec.dataset}/{spec.split} has {len(usable)} usable records "
                      f"(non-empty {', '.join(spec.fields.values())}), {per_process} per process, fewer than the "
                      f"process-local batch of {self.local_batch}; lower config.data.tasks.{spec.name}.batch_size")
    self._index_ds: dict[int, grain.MapDataset] = {}

  def _indices(self, process_index: int) -> grain.MapDataset:
    """Batches of record indices (int64 [B]) of one process: its shard, reshuffled every epoch."""
    if process_index not in self._index_ds:
      ds = grain.MapDataset.source(self.usable)[process_index::self._process_count]
      ds = ds.shuffle(seed=self._seed).repeat(None)
      self._index_ds[process_index] = ds.batch(self.local_batch, drop_remainder=True)
    return self._index_ds[process_index]

  def record_indices(self, k: int, process_index: int) -> np.ndarray:
    """Record indices int64 [B] of this task's k-th batch on `process_index`."""
    return np.asarray(self._indices(process_index)[k], np.int64)

  def rng(self, k: int, process_index: int, stream: int) -> np.random.Generator:
    return seeds.generator(self._seed, k, process_index, stream)

  def encode(self, texts: list[str]) -> np.ndarray:
    return self._tok.encode_batch(texts, self._max_len)  # int32 [n, L]

  def batch(self, k: int, process_index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_index_ds"] = {}
    return state


def _own_negatives(values: list) -> tuple[list[str], np.ndarray]:
  """(the distinct negative texts [M], int64 [N, Hm] each record's negatives as indices into them, -1 padded) of a
  Text or Sequence(Text) negatives column."""
  per_record = []
  for value in values:
    texts = (text_records.as_text(v) for v in ([value] if isinstance(value, (bytes, str)) else value))
    per_record.append([t for t in texts if t])
  index: dict[str, int] = {}
  cand = np.full((len(values), max([1] + [len(n) for n in per_record])), -1, np.int64)
  for i, texts in enumerate(per_record):
    cand[i, :len(texts)] = [index.setdefault(t, len(index)) for t in texts]
  return list(index), cand


class RetrievalBatches(TaskBatches):
  """query, key, ids; with num_negatives H > 0 also hard_negatives and hard_negative_valid (a mined set, or the
  records' own negatives); with a teacher-embedding store the teacher's rows of the same texts."""

  def __init__(self, spec, columns, *, mined, teacher, **kw):
    queries = [text_records.as_text(v) for v in columns[spec.fields["query"]]]
    docs = [text_records.as_text(v) for v in columns[spec.fields["doc"]]]
    usable = np.array([i for i, (q, d) in enumerate(zip(queries, docs)) if q and d], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._queries, self._docs = queries, docs
    self._doc_ids = np.array([text_records.text_id(d) for d in docs], np.int32)  # [N]
    self._teacher = teacher  # teacher_embeddings.TeacherEmbeddings or None
    # Candidates [N, Hm]: indices into a pool of texts (-1 = none), with their ids and whether they are usable.
    self._candidates = None
    if mined is not None:  # indices of records: their documents
      self._candidates, self._pool = mined.negatives, docs
      self._pool_ids, self._pool_ok = self._doc_ids, np.array([bool(d) for d in docs], bool)
    elif "negatives" in spec.fields:
      self._pool, self._candidates = _own_negatives(columns[spec.fields["negatives"]])
      self._pool_ids = np.array([text_records.text_id(t) for t in self._pool] or [0], np.int32)  # [M]
      self._pool_ok = np.ones(len(self._pool_ids), bool)

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)  # [B]
    ids = self._doc_ids[rows]
    out = {"query": self.encode([self._qp + self._queries[r] for r in rows]),
           "key": self.encode([self._dp + self._docs[r] for r in rows]),
           "ids": ids}
    if self._teacher is not None:
      out["teacher_query"] = np.asarray(self._teacher.query[rows])  # [B, D]
      out["teacher_key"] = np.asarray(self._teacher.doc[rows])
    if self._candidates is not None:
      h = self.spec.num_negatives
      cand = self._candidates[rows]  # [B, Hm]
      safe = np.maximum(cand, 0)
      cand_ids = self._pool_ids[safe]  # [B, Hm]
      ok = (cand >= 0) & self._pool_ok[safe] & ~np.isin(cand_ids, ids)  # [B, Hm]
      same = (cand_ids[:, :, None] == cand_ids[:, None, :]) & ok[:, None, :]  # [B, Hm, Hm]: j equals usable j'
      ok &= ~np.tril(same, k=-1).any(axis=2)  # a text listed twice counts once
      if ok.shape[1] < h:  # fewer candidates than negatives: padding slots
        pad = ((0, 0), (0, h - ok.shape[1]))
        cand, ok = np.pad(cand, pad, constant_values=-1), np.pad(ok, pad)
      order = np.argsort(np.where(ok, self.rng(k, process_index, 1).random(cand.shape), np.inf),
                         axis=1, kind="stable")[:, :h]  # [B, H]: usable candidates first, in random order
      chosen = np.take_along_axis(cand, order, axis=1)
      valid = np.take_along_axis(ok, order, axis=1)  # [B, H]
      texts = [self._dp + self._pool[c] if v else "" for c, v in zip(chosen.ravel(), valid.ravel())]
      out["hard_negatives"] = self.encode(texts).reshape(len(rows), h, self._max_len)
      out["hard_negative_valid"] = valid
      if self._teacher is not None:  # the candidates are records (a mined set; checked in text_tasks)
        rows_hn = np.asarray(self._teacher.doc[np.maximum(chosen, 0)])  # [B, H, D]
        out["teacher_hard_negatives"] = np.where(valid[..., None], rows_hn, np.float32(0))
    return out


class StsBatches(TaskBatches):
  """query (text_a), key (text_b), score."""

  def __init__(self, spec, columns, **kw):
    a = [text_records.as_text(v) for v in columns[spec.fields["text_a"]]]
    b = [text_records.as_text(v) for v in columns[spec.fields["text_b"]]]
    score = np.array([float(v) for v in columns[spec.fields["score"]]], np.float32)
    usable = np.array([i for i in range(len(a)) if a[i] and b[i] and np.isfinite(score[i])], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._a, self._b, self._score = a, b, score

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)
    return {"query": self.encode([self._qp + self._a[r] for r in rows]),
            "key": self.encode([self._dp + self._b[r] for r in rows]),
            "score": self._score[rows]}


class _LabelledBatches(TaskBatches):
  """A task whose rows are texts with labels: usable records have a text and at least one label."""

  def __init__(self, spec, columns, *, labels, **kw):
    texts = [text_records.as_text(v) for v in columns[spec.fields["text"]]]
    label_texts, per_record = labels  # [C] label texts; per record, its label ids
    usable = np.array([i for i, (t, ls) in enumerate(zip(texts, per_record)) if t and ls], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._texts = texts
    self.label_texts = label_texts
    self._label_tokens = self.encode([self._dp + t for t in label_texts])  # [C, L]


class ClassificationBatches(_LabelledBatches):
  """query (the text), key (its label's text), hard_negatives (H other label texts), ids (the label)."""

  def __init__(self, spec, columns, *, labels, **kw):
    super().__init__(spec, columns, labels=labels, **kw)
    self.num_negatives = text_tasks.label_negatives(spec, len(self.label_texts))
    self._label = np.array([ls[0] if ls else -1 for ls in labels[1]], np.int64)  # [N]

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)  # [B]
    y = self._label[rows]  # [B]
    keys = self.rng(k, process_index, 1).random((len(rows), len(self.label_texts)))  # [B, C]
    keys[np.arange(len(rows)), y] = np.inf  # never the row's own label
    negs = np.argsort(keys, axis=1, kind="stable")[:, :self.num_negatives]  # [B, H] distinct other labels
    return {"query": self.encode([self._qp + self._texts[r] for r in rows]),
            "key": self._label_tokens[y],
            "hard_negatives": self._label_tokens[negs],  # [B, H, L]
            "hard_negative_valid": np.ones(negs.shape, bool),
            "ids": y.astype(np.int32)}


class MultilabelBatches(_LabelledBatches):
  """query, label (one positive label text per row: the pool), positive / all positive / label ids, label_valid."""

  def __init__(self, spec, columns, *, labels, **kw):
    super().__init__(spec, columns, labels=labels, **kw)
    per_record = labels[1]
    width = max(len(per_record[i]) for i in self.usable)
    self._positives = np.full((len(per_record), width), -1, np.int64)  # [N, P]
    for i, ls in enumerate(per_record):
      self._positives[i, :len(ls)] = ls
    self._count = np.array([len(ls) for ls in per_record], np.int64)  # [N]

  def sampled_labels(self, k: int, process_index: int) -> np.ndarray:
    """The positive label id drawn for each row of batch k of `process_index`: int64 [B]."""
    rows = self.record_indices(k, process_index)
    u = self.rng(k, process_index, 1).random(len(rows))
    pick = np.minimum((u * self._count[rows]).astype(np.int64), self._count[rows] - 1)
    return self._positives[rows, pick]

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)
    pool = [self.sampled_labels(k, q) for q in range(self._process_count)]  # global pool, process order
    flat = np.concatenate(pool)
    _, first = np.unique(flat, return_index=True)
    first_mask = np.zeros(len(flat), bool)
    first_mask[first] = True
    start = process_index * self.local_batch
    label_ids = pool[process_index]
    return {"query": self.encode([self._qp + self._texts[r] for r in rows]),
            "label": self._label_tokens[label_ids],
            "positive_ids": label_ids[:, None].astype(np.int32),
            "all_positive_ids": self._positives[rows].astype(np.int32),
            "label_ids": label_ids.astype(np.int32),
            "label_valid": first_mask[start:start + self.local_batch]}


_BATCHES = {"retrieval": RetrievalBatches, "sts": StsBatches, "classification": ClassificationBatches,
            "multilabel": MultilabelBatches}


def open_task(spec: TaskSpec, reader: text_records.ColumnReader, features: Any, data_dir: str | None, *,
              tokenizer: Tokenizer, max_len: int, query_prefix: str, doc_prefix: str, seed: int,
              process_count: int) -> TaskBatches:
  """Reads the task's fields (and its mined set, teacher embeddings or label texts) and returns its batch builder.

  Args:
    spec: a task checked by `text_tasks.validate_tasks`.
    reader: reads the task's columns (shared by tasks of one split).
    features: the prepared dataset's features (`sources.features`).
    data_dir: where the mined sets and teacher embeddings live.
    tokenizer, max_len: encode every text as int32 [max_len].
    query_prefix, doc_prefix: put before query-side and document-side texts.
    seed: the run's seed; process_count: the processes that share each global batch.

  Raises:
    ConfigError: too few usable records for the process-local batch; a Text label with too few labels.
    DataError: the split, the mined set or the teacher embeddings are missing, or do not match the task.
  """
  columns = reader.read(spec.dataset, spec.split, list(spec.fields.values()))
  common = dict(tokenizer=tokenizer, max_len=int(max_len), query_prefix=query_prefix, doc_prefix=doc_prefix,
                seed=seed, process_count=process_count)
  extra = {}
  if spec.type == "retrieval":
    num_records = len(next(iter(columns.values())))
    extra["mined"] = (read_mined_for(spec, data_dir, num_records) if spec.num_negatives and spec.mined else None)
    extra["teacher"] = (read_teacher_for(spec, data_dir, num_records, extra["mined"], max_len=max_len,
                                         query_prefix=query_prefix, doc_prefix=doc_prefix)
                        if spec.teacher_embeddings else None)
  if spec.type in ("classification", "multilabel"):
    label = spec.fields["label"]
    extra["labels"] = text_records.label_vocab(features[label], columns[label])
  return _BATCHES[spec.type](spec, columns, **extra, **common)


def read_mined_for(spec: TaskSpec, data_dir: str | None, num_records: int) -> mined_negatives.MinedNegatives:
  """The mined set of retrieval task `spec` (`spec.mined`), checked to match it; `num_records` is the record count
  of the task's split.

  Raises:
    DataError: missing, corrupt, or mined for another dataset / split / fields / record count, or with
      fewer than num_negatives negatives per query ("re-mine with ...").
  """
  directory = mined_negatives.mined_dir(data_dir, spec.mined)
  if not (directory / "meta.json").is_file():
    raise DataError(f"No mined hard-negative set {spec.mined!r} in {directory.parent}; mine it first: python -m "
                    f"big_embed.mine --config <this recipe> --task {spec.name} --name {spec.mined} (or set "
                    f"config.data.tasks.{spec.name}.num_negatives=0 and mined='')")
  mined = mined_negatives.read_mined_negatives(directory)
  info = mined.info
  want = {"source_dataset": spec.dataset, "split": spec.split, "query_field": spec.fields["query"],
          "doc_field": spec.fields["doc"], "num_records": num_records}
  wrong = {k: (info.get(k), v) for k, v in want.items() if info.get(k) != v}
  if not wrong and info["num_negatives"] < spec.num_negatives:
    wrong = {"num_negatives": (info["num_negatives"], f">= {spec.num_negatives}")}
  if wrong:
    how = info.get("meta", {}).get("command") if isinstance(info.get("meta"), dict) else None
    raise DataError(
        f"Mined hard-negative set {directory} does not match task {spec.name!r}: "
        + ", ".join(f"{k} is {have!r}, the task needs {need!r}" for k, (have, need) in wrong.items())
        + f". Re-mine with dataset={spec.dataset!r}, split={spec.split!r}, query field {spec.fields['query']!r}, "
        f"doc field {spec.fields['doc']!r} and at least {spec.num_negatives} negatives per query"
        + (f" (it was mined with: {how})" if how else "") + ", or lower the task's num_negatives")
  return mined


def read_teacher_for(spec: TaskSpec, data_dir: str | None, num_records: int,
                     mined: mined_negatives.MinedNegatives | None, *, max_len: int, query_prefix: str,
                     doc_prefix: str) -> teacher_embeddings.TeacherEmbeddings:
  """The teacher embeddings of retrieval task `spec` (`spec.teacher_embeddings`), checked to be of the texts its
  batches hold (dataset, split, fields, record count, max_len, prefixes) and to cover every row they gather: the
  task's records and its mined negatives.

  Raises:
    DataError: missing, corrupt, or of other texts or too few records ("embed them again: ...").
  """
  rows = min(spec.max_records or num_records, num_records)
  if mined is not None and rows:
    rows = max(rows, int(mined.negatives[:rows].max()) + 1)
  facts = teacher_embeddings.task_facts(
      dataset=spec.dataset, split=spec.split, query_field=spec.fields["query"], doc_field=spec.fields["doc"],
      num_records=num_records, max_text_len=max_len, query_prefix=query_prefix, doc_prefix=doc_prefix)
  return teacher_embeddings.read_for_task(spec.teacher_embeddings, data_dir, facts, rows, spec.name)
