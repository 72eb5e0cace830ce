"""Task-homogeneous multi-task text batches (Piccolo2-style), deterministic and exactly resumable.

Tasks live in `config.data.tasks`, a ConfigDict task name -> task (see `default_text_task` for the fields):

    config.data.tasks = {
        "wordnet_defs": text_task(type="retrieval", dataset="wordnet", weight=2.0,
                                  fields={"query": "lemmas", "doc": "definition"}),
        "wordnet_lexname": text_task(type="classification", dataset="wordnet", num_negatives=7,
                                     fields={"text": "definition", "label": "lexname"}),
        "lee50": text_task(type="sts", dataset="lee50", split="test"),
    }

Every global batch belongs to one task, on every process. The task of global step s is drawn with
probabilities ∝ weight from an RNG seeded by (seed, s // SCHEDULE_BLOCK), identically on every process, and
the batch of step s is batch number k_s = #{s' < s : task(s') = task(s)} of that task's own stream. A task's
stream is a Grain MapDataset over its usable record indices: sharded `process_index::process_count`, shuffled
(a new permutation every epoch), repeated and batched at the task's process-local batch size. So the batch of
step s is a pure function of (seed, tasks, process, s); the training stream is a MapDataset indexed by step,
and its iterator (`to_iter_dataset`) has exact `get_state()` / `set_state()`, also through
`grain.checkpoint.CheckpointSave/CheckpointRestore`. State: {"next_index": s}, the number of batches read.
A restored state replays exactly when the tasks, the seed and the process count are unchanged (with other
tasks the stream simply continues at step s of the new schedule).

Batches (numpy, process-local batch size B = task batch_size // process_count, L = max_text_len):
  retrieval:      query, key int32 [B, L]; ids int32 [B] (a stable hash of the document text, so equal
                  documents are not each other's negatives); with num_negatives = H > 0 also
                  hard_negatives int32 [B, H, L] and hard_negative_valid bool [B, H] (from a mined set).
  sts:            query, key int32 [B, L] (text_a, text_b); score float32 [B].
  classification: query int32 [B, L] (the text), key int32 [B, L] (its label's text), hard_negatives int32
                  [B, H, L] (H other label texts, sampled without replacement), hard_negative_valid bool
                  [B, H] (all True), ids int32 [B] (the label id).
  multilabel:     query int32 [B, L]; label int32 [B, L] (one positive label text sampled per row: the
                  DEXML pool); positive_ids int32 [B, 1]; all_positive_ids int32 [B, P] (-1 padded, P = the
                  most labels of any record of the task); label_ids int32 [B]; label_valid bool [B].
Padding slots (hard_negative_valid False) hold all-pad rows (token 0 only).

Texts: the query prefix is put before queries and text_a, the document prefix before documents, text_b,
label texts and hard negatives. A field of type Sequence(Text) is joined with ", " (e.g. WordNet lemmas).
Records with an empty needed field (or a NaN score, or no label) are skipped: each task keeps a filtered list
of record indices, built once when the dataset is made (the needed fields of the split are read into
memory then). Label texts: a ClassLabel name with its separators "::", "." and "_" turned into spaces
("noun.animal" -> "noun animal", "game::strategy" -> "game strategy"); a Text label is used as it is
(its ids: positions in the sorted set of the split's label texts).

Multilabel label_valid: False for a label id already in the GLOBAL pool at an earlier position (processes in
order, rows in order). Every process recomputes the other processes' sampled labels for the step (record
indices and positive draws are cheap pure functions), so each label id is valid exactly once in the global
pool, whatever the number of processes.

Retrieval hard negatives come from a mined set `<data_dir>/mined/<name>/` (`write_mined_negatives`): row i
lists record indices of the same split (-1 = none). Per step and row, H of the row's usable candidates are
sampled without replacement; a candidate is unusable when it is -1, a record whose document is empty, or a
document equal (same id) to a positive of the process-local batch. Rows with fewer usable candidates are
padded (hard_negative_valid False).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from big_embed.data import paths, pipeline, sources
from big_embed.data.errors import DataError
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError

TASK_TYPES = ("retrieval", "sts", "classification", "multilabel")
# Record-field roles each task type reads (config task.fields.<role> names the record field).
TASK_ROLES: dict[str, tuple[str, ...]] = {
    "retrieval": ("query", "doc"),
    "sts": ("text_a", "text_b", "score"),
    "classification": ("text", "label"),
    "multilabel": ("text", "label"),
}
ALL_ROLES = ("query", "doc", "text_a", "text_b", "score", "text", "label")
# Which task types each loss (config.loss.name) trains on; wrapper losses are judged by their inner loss.
LOSS_TASK_TYPES: dict[str, tuple[str, ...]] = {
    "hybrid": ("retrieval", "sts", "classification"),
    "dexml": ("multilabel",),
    "cosent": ("sts",),
    **{name: ("retrieval",) for name in ("infonce", "clip", "siglip", "softclip", "lightclip", "peg",
                                          "teacher_kl", "disco_mse", "logit_kd", "sinkd", "repcon_kd")},
}
WRAPPER_LOSSES = ("matryoshka", "similarity_kd")  # config.loss.inner holds the loss that sees the batches
SCHEDULE_BLOCK = 4096  # steps per RNG block of the task schedule
MINED_DIR = "mined"
MINED_FORMAT = "big_embed.mined_negatives"
MINED_VERSION = 1
_LABEL_SEPARATORS = re.compile(r"::|[._]")


# ------------------------------------------------------------------------------------------------------------
# Config.

def default_text_task() -> ml_collections.ConfigDict:
  """The fields of one task of `config.data.tasks`, with their defaults.

  type: "retrieval" | "sts" | "classification" | "multilabel".
  dataset: the CLI name of a prepared dataset (`sources.DATASETS`).
  split: the split to train on.
  weight: > 0; the share of steps of this task is weight / (sum of the weights).
  batch_size: the task's global batch size (> 0; 0 = config.train.batch_size).
  fields: record field per role; a type reads only its roles: retrieval query, doc; sts text_a, text_b,
    score; classification and multilabel text, label (ClassLabel or Text; multilabel: a Sequence of them).
    Text roles accept Text or Sequence(Text) fields (joined with ", ").
  num_negatives: H. retrieval: mined hard negatives per row (0 = none; > 0 needs `mined`).
    classification: other label texts per row, sampled without replacement (0 = all other labels).
    sts, multilabel: must be 0.
  mined: name of a mined hard-negative set in <data_dir>/mined/<name>/ (retrieval only; "" = none).
  max_records: > 0: use only the split's first max_records records (a random subset: TFDS shuffles records
    by key hash when it writes them; mining with the same task uses the same subset); 0 = all.
  """
  return ml_collections.ConfigDict(dict(
      type="retrieval",
      dataset="",
      split="train",
      weight=1.0,
      batch_size=0,
      fields={role: role for role in ALL_ROLES},
      num_negatives=0,
      mined="",
      max_records=0,
  ))


def text_task(**overrides: Any) -> ml_collections.ConfigDict:
  """`default_text_task()` with `overrides` (`fields` is merged role by role).

  Raises:
    ConfigError: an override names no task field, or `fields` names an unknown role.
  """
  task = default_text_task()
  unknown = sorted(set(overrides) - set(task))
  if unknown:
    raise ConfigError(f"text task has no field(s) {unknown}; known: {sorted(task)}")
  fields = dict(overrides.pop("fields", None) or {})
  bad_roles = sorted(set(fields) - set(ALL_ROLES))
  if bad_roles:
    raise ConfigError(f"text task fields has no role(s) {bad_roles}; known: {list(ALL_ROLES)}")
  task.update(overrides)
  task.fields.update(fields)
  return task


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One resolved task of `config.data.tasks`."""
  name: str
  type: str
  dataset: str
  split: str
  weight: float
  batch_size: int  # global
  fields: dict[str, str]  # role -> record field, only the roles of `type`
  num_negatives: int
  mined: str
  max_records: int = 0  # 0 = all records of the split


def _as_int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ConfigError(f"{what} must be an integer, got {value!r}")
  return int(value)


def resolve_tasks(data_config: ml_collections.ConfigDict, default_batch_size: int) -> dict[str, TaskSpec]:
  """Checks the structure of `data_config.tasks` and returns name -> TaskSpec, sorted by name.

  Raises:
    ConfigError: no tasks; an unknown task field, type, dataset or role; weight <= 0; a bad batch size,
      num_negatives or mined name.
  """
  tasks = data_config.get("tasks", None)
  example = ("e.g. config.data.tasks = {'defs': text_pipeline.text_task(type='retrieval', dataset='wordnet', "
             "fields={'query': 'lemmas', 'doc': 'definition'})}")
  if not isinstance(tasks, (Mapping, ml_collections.ConfigDict)) or not tasks:
    raise ConfigError(f"config.data.tasks is empty; add at least one text task, {example}")
  defaults = default_text_task()
  specs = {}
  for name in sorted(tasks):
    task = tasks[name]
    where = f"config.data.tasks.{name}"
    if not isinstance(task, (Mapping, ml_collections.ConfigDict)):
      raise ConfigError(f"{where} must be a task ConfigDict (text_pipeline.text_task(...)), got {task!r}")
    unknown = sorted(set(task.keys()) - set(defaults))
    if unknown:
      raise ConfigError(f"{where} has unknown field(s) {unknown}; known: {sorted(defaults)}")
    get = lambda key, task=task: task[key] if key in task else defaults[key]  # pylint: disable=all
    task_type = get("type")
    if task_type not in TASK_TYPES:
      raise ConfigError(f"{where}.type={task_type!r} is unknown; use one of {list(TASK_TYPES)}")
    dataset = get("dataset")
    if dataset not in sources.DATASETS:
      raise ConfigError(f"{where}.dataset={dataset!r} is not a known dataset; known: {', '.join(sources.DATASETS)}")
    split = get("split")
    if not isinstance(split, str) or not split:
      raise ConfigError(f"{where}.split must be a split name such as 'train', got {split!r}")
    try:
      weight = float(get("weight"))
    except (TypeError, ValueError):
      weight = float("nan")
    if not (math.isfinite(weight) and weight > 0):
      raise ConfigError(f"{where}.weight must be a finite number > 0, got {get('weight')!r}")
    batch_size = _as_int(get("batch_size"), f"{where}.batch_size")
    if batch_size < 0:
      raise ConfigError(f"{where}.batch_size must be > 0 (or 0 = config.train.batch_size), got {batch_size}")
    batch_size = batch_size or int(default_batch_size)
    if batch_size <= 0:
      raise ConfigError(f"{where}.batch_size is 0 (= config.train.batch_size) but that is {default_batch_size}; "
                        "set a batch size > 0")
    fields = dict(defaults.fields)
    given = get("fields")
    bad_roles = sorted(set(given.keys()) - set(ALL_ROLES))
    if bad_roles:
      raise ConfigError(f"{where}.fields has unknown role(s) {bad_roles}; known: {list(ALL_ROLES)}")
    fields.update(dict(given))
    fields = {role: fields[role] for role in TASK_ROLES[task_type]}
    for role, field in fields.items():
      if not isinstance(field, str) or not field:
        raise ConfigError(f"{where}.fields.{role} must name a record field of {dataset!r}, got {field!r}")
    num_negatives = _as_int(get("num_negatives"), f"{where}.num_negatives")
    mined = get("mined")
    if not isinstance(mined, str):
      raise ConfigError(f"{where}.mined must be a mined set name or '', got {mined!r}")
    if num_negatives < 0:
      raise ConfigError(f"{where}.num_negatives must be >= 0, got {num_negatives}")
    if task_type in ("sts", "multilabel") and num_negatives:
      raise ConfigError(f"{where}.num_negatives={num_negatives}, but {task_type} tasks take no hard negatives; "
                        "set it to 0")
    if mined and task_type != "retrieval":
      raise ConfigError(f"{where}.mined={mined!r}, but only retrieval tasks read mined hard negatives; "
                        "set it to ''")
    if task_type == "retrieval" and num_negatives and not mined:
      raise ConfigError(f"{where}.num_negatives={num_negatives} needs a mined hard-negative set: set "
                        f"{where}.mined to its name (in <data_dir>/{MINED_DIR}/<name>), or num_negatives=0")
    if mined and (mined in (".", "..") or "/" in mined or os.sep in mined):
      raise ConfigError(f"{where}.mined={mined!r} must be a plain directory name under <data_dir>/{MINED_DIR}/")
    max_records = _as_int(get("max_records"), f"{where}.max_records")
    if max_records < 0:
      raise ConfigError(f"{where}.max_records must be >= 0 (0 = all records), got {max_records}")
    specs[name] = TaskSpec(name=str(name), type=task_type, dataset=dataset, split=split, weight=weight,
                           batch_size=batch_size, fields=fields, num_negatives=num_negatives, mined=mined,
                           max_records=max_records)
  return specs


def _loss_name(loss: Any) -> str:
  """The name of the loss that sees the batches (wrappers unwrapped); `loss` is a name or a loss config."""
  while isinstance(loss, (Mapping, ml_collections.ConfigDict)):
    loss = loss["inner"] if loss.get("name") in WRAPPER_LOSSES and "inner" in loss else loss.get("name")
  return str(loss)


def _field_kind(feature: Any) -> str:
  """"text", "text_seq", "class", "class_seq", "float" or "other" for a TFDS feature."""
  if isinstance(feature, tfds.features.ClassLabel):
    return "class"
  if isinstance(feature, tfds.features.Text):
    return "text"
  if isinstance(feature, tfds.features.Sequence):
    inner = _field_kind(feature.feature)
    return {"text": "text_seq", "class": "class_seq"}.get(inner, "other")
  if isinstance(feature, tfds.features.Tensor) and not feature.shape and np.dtype(feature.np_dtype).kind in "fiu":
    return "float"
  return "other"


# Accepted field kinds per (task type, role).
_ROLE_KINDS = {
    ("classification", "label"): ("class", "text"),
    ("multilabel", "label"): ("class_seq", "text_seq"),
    ("sts", "score"): ("float",),
}
_TEXT_KINDS = ("text", "text_seq")


def _check_fields(spec: TaskSpec, features: Any) -> dict[str, str]:
  """Checks the task's fields against the dataset's features; returns role -> field kind.

  Raises:
    ConfigError: a field the dataset lacks, or of a kind the role cannot read.
  """
  kinds = {}
  for role, field in spec.fields.items():
    where = f"config.data.tasks.{spec.name}.fields.{role}"
    if field not in features:
      raise ConfigError(f"{where}={field!r}: dataset {spec.dataset!r} has no such field; its fields: "
                        f"{', '.join(features.keys())}")
    kind = _field_kind(features[field])
    allowed = _ROLE_KINDS.get((spec.type, role), _TEXT_KINDS)
    if kind not in allowed:
      raise ConfigError(f"{where}={field!r} is a {type(features[field]).__name__} ({kind}); a {spec.type} "
                        f"{role} must be one of: {', '.join(allowed)}")
    kinds[role] = kind
  return kinds


def _features(dataset: str, data_dir: str | None) -> Any:
  return sources.make_builder(dataset, data_dir).info.features


def validate_tasks(data_config: ml_collections.ConfigDict, default_batch_size: int, batch_shards: int,
                   process_count: int, loss_name: Any) -> dict[str, TaskSpec]:
  """Checks `config.data.tasks` against the mesh, the processes and the loss; returns the resolved tasks.

  Args:
    data_config: `config.data` with `tasks` (and `data_dir`, to check field names against the datasets).
    default_batch_size: config.train.batch_size (used by tasks with batch_size 0).
    batch_shards: data-parallel shards of the mesh; every task's global batch must divide by it.
    process_count: JAX processes; every task's global batch must divide by it.
    loss_name: config.loss.name (or the loss config itself; wrapper losses are judged by their inner loss).

  Raises:
    ConfigError: anything `resolve_tasks` rejects; a batch size the shards or processes do not divide;
      a field the dataset lacks or cannot serve; task types the loss cannot train on (`LOSS_TASK_TYPES`).
  """
  specs = resolve_tasks(data_config, default_batch_size)
  loss = _loss_name(loss_name)
  if loss not in LOSS_TASK_TYPES:
    raise ConfigError(f"config.loss.name={loss!r} does not train on text tasks; use one of: "
                      + "; ".join(f"{k} ({'/'.join(v)})" for k, v in LOSS_TASK_TYPES.items()))
  allowed = LOSS_TASK_TYPES[loss]
  bad = {name: spec.type for name, spec in specs.items() if spec.type not in allowed}
  if bad:
    raise ConfigError(f"loss {loss!r} trains only on {'/'.join(allowed)} tasks, but config.data.tasks has "
                      + ", ".join(f"{n} ({t})" for n, t in bad.items())
                      + f"; remove them or pick a loss for them ({_losses_for(set(bad.values()))})")
  data_dir = data_config.get("data_dir", "") or None
  for spec in specs.values():
    for what, count in (("data-parallel batch shards of the mesh", batch_shards), ("processes", process_count)):
      if spec.batch_size % int(count):
        raise ConfigError(f"config.data.tasks.{spec.name} has global batch size {spec.batch_size}, not divisible "
                          f"by the {count} {what}; use a multiple of {count}")
    try:
      features = _features(spec.dataset, data_dir)
    except Exception:  # pylint: disable=broad-except
      continue  # Cannot be checked cheaply; the pipeline checks again when it opens the data.
    kinds = _check_fields(spec, features)
    if spec.type == "classification" and kinds["label"] == "class":
      _check_label_negatives(spec, features[spec.fields["label"]].num_classes)
  return specs


def _losses_for(task_types: set[str]) -> str:
  names = [k for k, v in LOSS_TASK_TYPES.items() if task_types <= set(v)]
  return "one of " + ", ".join(names) if names else "no single loss trains on all of them"


def _check_label_negatives(spec: TaskSpec, num_classes: int) -> int:
  """Returns H for a classification task with `num_classes` labels."""
  if num_classes < 2:
    raise ConfigError(f"config.data.tasks.{spec.name}: classification needs at least 2 labels, "
                      f"{spec.dataset}.{spec.fields['label']} has {num_classes}")
  if spec.num_negatives > num_classes - 1:
    raise ConfigError(f"config.data.tasks.{spec.name}.num_negatives={spec.num_negatives} exceeds the "
                      f"{num_classes - 1} other labels of {spec.dataset}.{spec.fields['label']}; "
                      f"use at most {num_classes - 1} (0 = all)")
  return spec.num_negatives or num_classes - 1


# ------------------------------------------------------------------------------------------------------------
# Mined hard negatives.

def mined_dir(data_dir: str | os.PathLike[str] | None, name: str) -> pathlib.Path:
  """`<data_dir>/mined/<name>`: where the mined hard-negative set `name` lives."""
  return paths.resolve_data_dir(data_dir) / MINED_DIR / name


@dataclasses.dataclass(frozen=True)
class MinedNegatives:
  """A mined hard-negative set: negatives int64 [Nq, H] (record indices, -1 = none), scores float32 [Nq, H]."""
  negatives: np.ndarray
  scores: np.ndarray
  info: dict  # meta.json: format, version, source_dataset, split, query_field, doc_field, num_records,
  #             num_negatives, meta (the miner's own dict)


def write_mined_negatives(directory: str | os.PathLike[str], *, source_dataset: str, split: str, query_field: str,
                          doc_field: str, negatives: np.ndarray, scores: np.ndarray, meta: dict) -> pathlib.Path:
  """Writes a mined hard-negative set atomically (a temporary sibling directory, then a rename).

  Layout: `negatives.npy` int64 [Nq, H], `scores.npy` float32 [Nq, H], `meta.json`. Row i belongs to record i
  of `split` of `source_dataset` (before any filtering); its entries are record indices of the same split,
  -1 = none. An existing set at `directory` is replaced.

  Args:
    directory: usually `mined_dir(data_dir, name)`.
    source_dataset, split: the dataset CLI name and split the indices refer to (Nq = its record count).
    query_field, doc_field: the record fields the queries and documents were mined with.
    negatives: int [Nq, H]; scores: float [Nq, H] (e.g. the miner's similarities; NaN where -1).
    meta: JSON-serialisable facts about the mining (model, command, ...). A "command" entry is quoted when the
      set no longer matches a task.

  Returns:
    The directory.

  Raises:
    ValueError: bad shapes, dtypes or indices, or `meta` is not JSON-serialisable.
  """
  directory = pathlib.Path(directory).absolute()
  negatives = np.asarray(negatives)
  scores = np.asarray(scores)
  if negatives.ndim != 2 or negatives.dtype.kind not in "iu":
    raise ValueError(f"negatives must be an integer array [Nq, H], got {negatives.dtype} {negatives.shape}")
  if scores.shape != negatives.shape:
    raise ValueError(f"scores must have the shape of negatives {negatives.shape}, got {scores.shape}")
  if negatives.size and (negatives.min() < -1 or negatives.max() >= negatives.shape[0]):
    raise ValueError(f"negatives must be record indices in [0, {negatives.shape[0]}) or -1, got values in "
                     f"[{negatives.min()}, {negatives.max()}]")
  info = {"format": MINED_FORMAT, "version": MINED_VERSION, "source_dataset": source_dataset, "split": split,
          "query_field": query_field, "doc_field": doc_field, "num_records": int(negatives.shape[0]),
          "num_negatives": int(negatives.shape[1]), "meta": meta}
  try:
    text = json.dumps(info, indent=2)
  except TypeError as e:
    raise ValueError(f"meta must be JSON-serialisable: {e}") from e
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
  tmp.mkdir()
  try:
    np.save(tmp / "negatives.npy", negatives.astype(np.int64))
    np.save(tmp / "scores.npy", scores.astype(np.float32))
    (tmp / "meta.json").write_text(text, encoding="utf-8")
    old = None
    if directory.exists():
      old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
      directory.rename(old)
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return directory


def read_mined_negatives(directory: str | os.PathLike[str]) -> MinedNegatives:
  """Reads a set written by `write_mined_negatives`.

  Raises:
    DataError: the set is missing, incomplete or corrupt.
  """
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.is_file():
    raise DataError(f"No mined hard-negative set in {directory} (no meta.json); mine it first with the "
                    "hard-negative mining command, or set the task's num_negatives=0 and mined=''")
  try:
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    negatives = np.load(directory / "negatives.npy")
    scores = np.load(directory / "scores.npy")
  except (OSError, ValueError) as e:
    raise DataError(f"Corrupt mined hard-negative set {directory} ({type(e).__name__}: {e}); mine it again") from e
  if info.get("format") != MINED_FORMAT or info.get("version") != MINED_VERSION:
    raise DataError(f"{meta_path} is not a {MINED_FORMAT} v{MINED_VERSION} set (format={info.get('format')!r}, "
                    f"version={info.get('version')!r}); mine it again")
  if negatives.shape != (info["num_records"], info["num_negatives"]) or scores.shape != negatives.shape:
    raise DataError(f"Corrupt mined hard-negative set {directory}: negatives {negatives.shape}, scores "
                    f"{scores.shape}, meta.json says ({info['num_records']}, {info['num_negatives']}); "
                    "mine it again")
  return MinedNegatives(negatives.astype(np.int64), scores.astype(np.float32), info)


def _load_mined_for(spec: TaskSpec, data_dir: str | None, num_records: int) -> MinedNegatives:
  """The task's mined set, checked to match it.

  Raises:
    DataError: missing, corrupt, or mined for another dataset / split / fields / record count, or with
      fewer than num_negatives negatives per query ("re-mine with ...").
  """
  directory = mined_dir(data_dir, spec.mined)
  if not (directory / "meta.json").is_file():
    raise DataError(f"No mined hard-negative set {spec.mined!r} in {directory.parent}; mine it first: python -m "
                    f"big_embed.mine --config <this recipe> --task {spec.name} --name {spec.mined} (or set "
                    f"config.data.tasks.{spec.name}.num_negatives=0 and mined='')")
  mined = read_mined_negatives(directory)
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


# ------------------------------------------------------------------------------------------------------------
# Reading records.

def _seed(seed: int, *parts: Any) -> int:
  """A 32-bit seed derived from `seed` and a stream name (stable across runs and machines)."""
  digest = hashlib.sha1(repr((int(seed),) + tuple(str(p) for p in parts)).encode()).digest()
  return int.from_bytes(digest[:4], "big")


def _rng(*seeds: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(s) for s in seeds])))


def _str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_text(value: Any) -> str:
  """Text -> stripped str; Sequence(Text) -> its non-empty items joined with ", "."""
  if isinstance(value, (bytes, str)):
    return _str(value).strip()
  return ", ".join(t for t in (_str(v).strip() for v in value) if t)


def humanize_label(name: str) -> str:
  """A ClassLabel name as text: "::", "." and "_" become spaces ("noun.animal" -> "noun animal")."""
  return " ".join(_LABEL_SEPARATORS.sub(" ", name).split())


def text_id(text: str) -> int:
  """A stable non-negative int32 id of a text (equal texts, equal ids)."""
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def _read_columns(dataset: str, data_dir: str | None, split: str, fields: Sequence[str],
                  cache: dict) -> dict[str, list]:
  """Reads `fields` of every record of the split: field -> list of raw values (record order)."""
  key = (dataset, split)
  if key not in cache:
    cache[key] = {"source": sources.open_split(dataset, data_dir, split), "columns": {}}
  entry = cache[key]
  missing = [f for f in fields if f not in entry["columns"]]
  if missing:
    source = entry["source"]
    columns = {f: [] for f in missing}
    chunk = 4096
    for start in range(0, len(source), chunk):
      for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
        for f in missing:
          columns[f].append(record[f])
    entry["columns"].update(columns)
  return {f: entry["columns"][f] for f in fields}


def _label_vocab(spec: TaskSpec, features: Any, kind: str, values: list) -> tuple[list[str], list[list[int]]]:
  """(label texts, per-record label ids) of a classification or multilabel field."""
  if kind in ("class", "class_seq"):
    feature = features[spec.fields["label"]]
    names = list((feature.feature if kind == "class_seq" else feature).names)
    texts = [humanize_label(n) for n in names]
    if kind == "class":
      return texts, [[int(v)] for v in values]
    return texts, [sorted({int(x) for x in v}) for v in values]
  per_record = [[_str(values[i]).strip()] if kind == "text" else [_str(x).strip() for x in values[i]]
                for i in range(len(values))]
  per_record = [[t for t in labels if t] for labels in per_record]
  vocab = sorted({t for labels in per_record for t in labels})
  index = {t: i for i, t in enumerate(vocab)}
  return vocab, [sorted({index[t] for t in labels}) for labels in per_record]


# ------------------------------------------------------------------------------------------------------------
# Per-task streams.

class _Task:
  """One task: its usable records in memory, its per-process index streams and its batch builder."""

  def __init__(self, spec: TaskSpec, *, tokenizer: Tokenizer, max_len: int, query_prefix: str, doc_prefix: str,
               seed: int, process_count: int, usable: np.ndarray):
    self.spec = spec
    self.name = spec.name
    self._tok = tokenizer
    self._max_len = max_len
    self._qp, self._dp = query_prefix, doc_prefix
    self._seed = _seed(seed, "task", spec.name)
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
    return _rng(self._seed, k, process_index, stream)

  def encode(self, texts: list[str]) -> np.ndarray:
    return self._tok.encode_batch(texts, self._max_len)  # int32 [n, L]

  def batch(self, k: int, process_index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_index_ds"] = {}
    return state


class _RetrievalTask(_Task):

  def __init__(self, spec, columns, *, mined_loader, **kw):
    queries = [as_text(v) for v in columns[spec.fields["query"]]]
    docs = [as_text(v) for v in columns[spec.fields["doc"]]]
    usable = np.array([i for i, (q, d) in enumerate(zip(queries, docs)) if q and d], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._queries, self._docs = queries, docs
    self._doc_ok = np.array([bool(d) for d in docs], bool)  # [N]
    self._doc_ids = np.array([text_id(d) for d in docs], np.int32)  # [N]
    self._negatives = mined_loader(len(docs)).negatives if spec.num_negatives else None  # [N, Hm]

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)  # [B]
    ids = self._doc_ids[rows]
    out = {"query": self.encode([self._qp + self._queries[r] for r in rows]),
           "key": self.encode([self._dp + self._docs[r] for r in rows]),
           "ids": ids}
    if self._negatives is not None:
      h = self.spec.num_negatives
      cand = self._negatives[rows]  # [B, Hm]
      safe = np.maximum(cand, 0)
      cand_ids = self._doc_ids[safe]  # [B, Hm]
      ok = (cand >= 0) & self._doc_ok[safe] & ~np.isin(cand_ids, ids)  # [B, Hm]
      same = (cand_ids[:, :, None] == cand_ids[:, None, :]) & ok[:, None, :]  # [B, Hm, Hm]: j equals usable j'
      ok &= ~np.tril(same, k=-1).any(axis=2)  # a document listed twice counts once
      order = np.argsort(np.where(ok, self.rng(k, process_index, 1).random(cand.shape), np.inf),
                         axis=1, kind="stable")[:, :h]  # [B, H]: usable candidates first, in random order
      chosen = np.take_along_axis(cand, order, axis=1)
      valid = np.take_along_axis(ok, order, axis=1)  # [B, H]
      texts = [self._dp + self._docs[c] if v else "" for c, v in zip(chosen.ravel(), valid.ravel())]
      out["hard_negatives"] = self.encode(texts).reshape(len(rows), h, self._max_len)
      out["hard_negative_valid"] = valid
    return out


class _StsTask(_Task):

  def __init__(self, spec, columns, **kw):
    a = [as_text(v) for v in columns[spec.fields["text_a"]]]
    b = [as_text(v) for v in columns[spec.fields["text_b"]]]
    score = np.array([float(v) for v in columns[spec.fields["score"]]], np.float32)
    usable = np.array([i for i in range(len(a)) if a[i] and b[i] and np.isfinite(score[i])], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._a, self._b, self._score = a, b, score

  def batch(self, k, process_index):
    rows = self.record_indices(k, process_index)
    return {"query": self.encode([self._qp + self._a[r] for r in rows]),
            "key": self.encode([self._dp + self._b[r] for r in rows]),
            "score": self._score[rows]}


class _ClassificationTask(_Task):

  def __init__(self, spec, columns, *, labels, **kw):
    texts = [as_text(v) for v in columns[spec.fields["text"]]]
    label_texts, per_record = labels
    usable = np.array([i for i, (t, ls) in enumerate(zip(texts, per_record)) if t and ls], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self.num_negatives = _check_label_negatives(spec, len(label_texts))
    self._texts = texts
    self._label = np.array([ls[0] if ls else -1 for ls in per_record], np.int64)  # [N]
    self.label_texts = label_texts
    self._label_tokens = self.encode([self._dp + t for t in label_texts])  # [C, L]

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


class _MultilabelTask(_Task):

  def __init__(self, spec, columns, *, labels, **kw):
    texts = [as_text(v) for v in columns[spec.fields["text"]]]
    label_texts, per_record = labels
    usable = np.array([i for i, (t, ls) in enumerate(zip(texts, per_record)) if t and ls], np.int64)
    super().__init__(spec, usable=usable, **kw)
    self._texts = texts
    width = max(len(per_record[i]) for i in usable)
    self._positives = np.full((len(texts), width), -1, np.int64)  # [N, P]
    for i, ls in enumerate(per_record):
      self._positives[i, :len(ls)] = ls
    self._count = np.array([len(ls) for ls in per_record], np.int64)  # [N]
    self.label_texts = label_texts
    self._label_tokens = self.encode([self._dp + t for t in label_texts])  # [C, L]

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


# ------------------------------------------------------------------------------------------------------------
# The step-indexed stream.

class _Schedule:
  """Global step -> (task index, how many earlier steps had that task); identical on every process.

  Steps are drawn in blocks of SCHEDULE_BLOCK from PCG64(SeedSequence([seed, block])): u ~ U[0, 1), task =
  the first t with u < cdf[t]. Per-block task counts are computed lazily and kept (T int64 per block), the
  blocks themselves only for the last few; thread-safe.
  """

  def __init__(self, weights: Sequence[float], seed: int):
    w = np.asarray(weights, np.float64)
    self._cdf = np.cumsum(w) / w.sum()
    self._seed = int(seed)
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._before: list[np.ndarray] = [np.zeros(len(self._cdf), np.int64)]  # task counts before block b
    self._recent: dict[int, np.ndarray] = {}  # the last few blocks, uint16 [SCHEDULE_BLOCK]

  def _draw(self, b: int) -> np.ndarray:
    u = _rng(self._seed, b).random(SCHEDULE_BLOCK)
    return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1).astype(np.uint16)

  def _block(self, b: int) -> np.ndarray:
    """Block b's tasks; extends the counts up to block b first (call with the lock held)."""
    while len(self._before) <= b:
      block = self._draw(len(self._before) - 1)
      self._before.append(self._before[-1] + np.bincount(block, minlength=len(self._cdf)))
    if b not in self._recent:
      if len(self._recent) >= 4:
        self._recent.pop(min(self._recent))
      self._recent[b] = self._draw(b)
    return self._recent[b]

  def __call__(self, step: int) -> tuple[int, int]:
    b, j = divmod(int(step), SCHEDULE_BLOCK)
    with self._lock:
      block, before = self._block(b), self._before[b]
    t = int(block[j])
    return t, int(before[t] + np.count_nonzero(block[:j] == t))

  def __getstate__(self):
    return {"_cdf": self._cdf, "_seed": self._seed}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()


class _StepDataset(grain.MapDataset):
  """Infinite MapDataset: element s = (task name, process-local batch of global step s)."""

  def __init__(self, tasks: list[_Task], schedule: _Schedule, process_index: int):
    super().__init__()
    self._tasks, self._schedule, self._process_index = tasks, schedule, process_index

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    t, k = self._schedule(index)
    task = self._tasks[t]
    return task.name, task.batch(k, self._process_index)

  def __str__(self) -> str:
    return f"TextTaskStepDataset(tasks={[t.name for t in self._tasks]}, process={self._process_index})"


_TASK_CLASSES = {"retrieval": _RetrievalTask, "sts": _StsTask, "classification": _ClassificationTask,
                 "multilabel": _MultilabelTask}


def make_text_train_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                            default_batch_size: int, max_text_len: int, query_prefix: str, doc_prefix: str,
                            seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The multi-task text training stream of this process.

  Args:
    data_config: `tasks` (see the module doc and `default_text_task`), `data_dir`, `num_threads`,
      `prefetch_buffer_size`, `worker_count` (as in `pipeline.default_data_config`).
    tokenizer: encodes every text.
    default_batch_size: global batch size of tasks with batch_size 0 (config.train.batch_size).
    max_text_len: L, tokens per text.
    query_prefix, doc_prefix: put before query-side and document-side texts (see the module doc).
    seed: fixes the task schedule, the record order and every sampled negative / label.
    process_index, process_count: this process reads shard process_index::process_count of every task and
      yields its share (batch_size // process_count rows) of each global batch.

  Returns:
    An infinite `grain.IterDataset` of (task name, batch dict) — the batch of one task, shapes in the module
    doc. `iter(ds)` has exact `get_state()` / `set_state()` (state {"next_index": batches read}).

  Raises:
    ConfigError: bad tasks (`resolve_tasks`), a field the dataset lacks, a batch size the processes do not
      divide, more label negatives than labels.
    DataError: a dataset or mined set is missing or does not match; a task has too few usable records.
  """
  defaults = pipeline.default_data_config()
  get = lambda key: data_config.get(key, defaults[key])  # pylint: disable=unnecessary-lambda-assignment
  specs = resolve_tasks(data_config, default_batch_size)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  data_dir = get("data_dir") or None
  cache: dict = {}
  tasks = []
  common = dict(tokenizer=tokenizer, max_len=int(max_text_len), query_prefix=query_prefix,
                doc_prefix=doc_prefix, seed=seed, process_count=process_count)
  for spec in specs.values():
    if spec.batch_size % process_count:
      raise ConfigError(f"config.data.tasks.{spec.name} has global batch size {spec.batch_size}, not divisible "
                        f"by the {process_count} processes; use a multiple of {process_count}")
    features = _features(spec.dataset, data_dir)
    kinds = _check_fields(spec, features)
    columns = _read_columns(spec.dataset, data_dir, spec.split, list(dict.fromkeys(spec.fields.values())), cache)
    extra = {}
    if spec.type == "retrieval":
      extra["mined_loader"] = lambda n, spec=spec: _load_mined_for(spec, data_dir, n)
    if spec.type in ("classification", "multilabel"):
      extra["labels"] = _label_vocab(spec, features, kinds["label"], columns[spec.fields["label"]])
    tasks.append(_TASK_CLASSES[spec.type](spec, columns, **extra, **common))
  cache.clear()
  schedule = _Schedule([t.spec.weight for t in tasks], _seed(seed, "schedule"))
  ds = _StepDataset(tasks, schedule, process_index)
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(get("num_threads")),
                                             prefetch_buffer_size=int(get("prefetch_buffer_size"))))
  if int(get("worker_count")) > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(get("worker_count"))))
  return ids
