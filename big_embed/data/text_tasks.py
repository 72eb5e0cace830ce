"""The text tasks of `config.data.tasks`: each resolved into a `TaskSpec` and checked once, before training starts.

    config.data.tasks = {
        "wordnet_defs": config_utils.text_task(type="retrieval", dataset="wordnet", weight=2.0,
                                               fields={"query": "lemmas", "doc": "definition"}),
        "wordnet_lexname": config_utils.text_task(type="classification", dataset="wordnet", num_negatives=7,
                                                  fields={"text": "definition", "label": "lexname"}),
        "lee50": config_utils.text_task(type="sts", dataset="lee50", split="test"),
    }

A task's fields and their defaults are `big_embed.config_schema.TEXT_TASK`. Its type says which record-field roles
it reads (`TYPE_ROLES`) and what its batches hold (`big_embed.data.text_batches`): retrieval (query -> doc,
optionally hard negatives), sts (scored text pairs), classification (text -> its label's text against other
label texts) and multilabel (text -> one of its labels, in a pool of the batch's labels). Text roles read Text or
Sequence(Text) fields; a classification label is a ClassLabel or Text field, a multilabel label a Sequence of
either, an sts score a number. A role left empty reads the dataset's default field for the task type (its registry
entry's retrieval / sts / probe / multilabel defaults, e.g. query -> positive of a dataset of your own), else the
field named like the role. A retrieval task's hard negatives (num_negatives > 0) come from a mined set (`mined`) or,
without one, from the records' own negatives (`Corpus.negatives`, e.g. the `negative(s)` of `prepare files`), which
belong to the dataset's default (query, doc) pair. A retrieval task's `teacher_embeddings` names a frozen teacher's
embeddings of its texts (`data.teacher_embeddings`, written by `python -m big_embed.embed_teacher`), which its
batches then carry; its hard negatives, if any, must then be mined (the store has rows of records only).

`validate_tasks` is the one check: the structure (`resolve_tasks`), batch sizes against the mesh and the
processes, and every field against the prepared dataset's features, with label counts. The training stream
(`text_stream.make_text_train_dataset`) takes its result and checks nothing again; what needs the records
themselves (enough usable records for a batch, the label count of a Text label, a mined set matching its task)
is checked where the records are read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from big_embed import config_schema
from big_embed.data import corpora, paths, reading, sources
from big_embed.data.mined_negatives import MINED_DIR
from big_embed.errors import ConfigError

# Record-field roles each task type reads (config task.fields.<role> names the record field).
TYPE_ROLES: dict[str, tuple[str, ...]] = {
    "retrieval": ("query", "doc"),
    "sts": ("text_a", "text_b", "score"),
    "classification": ("text", "label"),
    "multilabel": ("text", "label"),
}
# Field kinds (`corpora.field_kind`) each (task type, role) reads; text roles read `corpora.TEXT_KINDS`.
_ROLE_KINDS = {
    ("classification", "label"): ("class", "text"),
    ("multilabel", "label"): ("class_seq", "text_seq"),
    ("sts", "score"): ("float",),
}
_EXAMPLE = ("e.g. config.data.tasks = {'defs': config_utils.text_task(type='retrieval', dataset='wordnet', "
            "fields={'query': 'lemmas', 'doc': 'definition'})}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One resolved task of `config.data.tasks`."""
  name: str
  type: str  # one of config_schema.TASK_TYPES
  dataset: str
  split: str
  weight: float
  batch_size: int  # global
  fields: dict[str, str]  # role -> record field, only the roles of `type` (+ "negatives": in-record hard negatives)
  num_negatives: int
  mined: str
  max_records: int = 0  # 0 = all records of the split
  teacher_embeddings: str = ""  # a store of `teacher_embeddings` ('' = none)


def _as_int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ConfigError(f"{what} must be an integer, got {value!r}")
  return int(value)


def _weight(value: Any, where: str) -> float:
  try:
    weight = float(value)
  except (TypeError, ValueError):
    weight = float("nan")
  if not (math.isfinite(weight) and weight > 0):
    raise ConfigError(f"{where}.weight must be a finite number > 0, got {value!r}")
  return weight


def _batch_size(value: Any, default_batch_size: int, where: str) -> int:
  batch_size = _as_int(value, f"{where}.batch_size")
  if batch_size < 0:
    raise ConfigError(f"{where}.batch_size must be > 0 (or 0 = config.train.batch_size), got {batch_size}")
  batch_size = batch_size or int(default_batch_size)
  if batch_size <= 0:
    raise ConfigError(f"{where}.batch_size is 0 (= config.train.batch_size) but that is {default_batch_size}; "
                      "set a batch size > 0")
  return batch_size


# The registry entry's default fields of each task type, in the order of the type's roles.
_CORPUS_DEFAULTS = {"retrieval": "retrieval", "sts": "sts", "classification": "probe", "multilabel": "multilabel"}


def _fields(given: Any, task_type: str, corpus: corpora.Corpus, where: str) -> dict[str, str]:
  """role -> field: given, else the corpus's default for the task type, else the role's own name."""
  bad_roles = sorted(set(given.keys()) - set(config_schema.TASK_ROLES))
  if bad_roles:
    raise ConfigError(f"{where}.fields has unknown role(s) {bad_roles}; known: {list(config_schema.TASK_ROLES)}")
  roles = TYPE_ROLES[task_type]
  corpus_defaults = dict(zip(roles, getattr(corpus, _CORPUS_DEFAULTS[task_type]) or ()))
  fields = {role: given[role] if role in given and given[role] != "" else corpus_defaults.get(role, role)
            for role in roles}
  for role, field in fields.items():
    if not isinstance(field, str) or not field:
      raise ConfigError(f"{where}.fields.{role} must name a record field of {corpus.name!r}, got {field!r}")
  return fields


def _negatives(task: Any, task_type: str, where: str) -> tuple[int, str]:
  num_negatives = _as_int(task["num_negatives"], f"{where}.num_negatives")
  mined = task["mined"]
  if not isinstance(mined, str):
    raise ConfigError(f"{where}.mined must be a mined set name or '', got {mined!r}")
  if num_negatives < 0:
    raise ConfigError(f"{where}.num_negatives must be >= 0, got {num_negatives}")
  if task_type in ("sts", "multilabel") and num_negatives:
    raise ConfigError(f"{where}.num_negatives={num_negatives}, but {task_type} tasks take no hard negatives; "
                      "set it to 0")
  if mined and task_type != "retrieval":
    raise ConfigError(f"{where}.mined={mined!r}, but only retrieval tasks read mined hard negatives; set it to ''")
  if mined:
    paths.check_name(mined, f"{where}.mined")
  return num_negatives, mined


def _teacher_embeddings(task: Any, task_type: str, num_negatives: int, mined: str, where: str) -> str:
  """The task's teacher-embedding store name ('' = none), checked: retrieval only, and its hard negatives (if any)
  must be records (a mined set), which are what the store has rows of."""
  name = task["teacher_embeddings"]
  if not isinstance(name, str):
    raise ConfigError(f"{where}.teacher_embeddings must be a teacher embeddings name or '', got {name!r}")
  if not name:
    return name
  if task_type != "retrieval":
    raise ConfigError(f"{where}.teacher_embeddings={name!r}, but only retrieval tasks read teacher embeddings; "
                      "set it to ''")
  paths.check_name(name, f"{where}.teacher_embeddings")
  if num_negatives and not mined:
    raise ConfigError(f"{where}.teacher_embeddings={name!r} with num_negatives={num_negatives} and no mined set: "
                      "the records' own negative texts have no teacher embeddings (the store has rows of records "
                      f"only); mine the negatives ({where}.mined=<name>, python -m big_embed.mine) or set "
                      "num_negatives=0")
  return name


def _resolve_task(name: str, given: Any, default_batch_size: int, data_dir: str | None) -> TaskSpec:
  where = f"config.data.tasks.{name}"
  if not isinstance(given, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a task ConfigDict (config_utils.text_task(...)), got {given!r}")
  defaults = config_schema.text_task_defaults()
  unknown = sorted(set(given.keys()) - set(defaults))
  if unknown:
    raise ConfigError(f"{where} has unknown field(s) {unknown}; known: {sorted(defaults)}")
  task = {key: given[key] if key in given else defaults[key] for key in defaults}
  task_type = task["type"]
  if task_type not in TYPE_ROLES:
    raise ConfigError(f"{where}.type={task_type!r} is unknown; use one of {list(config_schema.TASK_TYPES)}")
  dataset = task["dataset"]
  text_datasets = sources.names("text", data_dir)
  if dataset not in text_datasets:
    raise ConfigError(f"{where}.dataset={dataset!r} is not a known text corpus; known: {', '.join(text_datasets)} "
                      f"(the bundled ones and those found in the data dir {paths.resolve_data_dir(data_dir)}; build "
                      "one of your own with python -m big_embed.data.prepare files --name NAME --train FILE)")
  corpus = sources.corpus(dataset, data_dir)
  split = task["split"]
  splits = corpus.splits
  if not isinstance(split, str) or split.split("[", 1)[0] not in splits:
    raise ConfigError(f"{where}.split={split!r} is not a split of {dataset!r}; its splits: {', '.join(splits)}")
  num_negatives, mined = _negatives(task, task_type, where)
  teacher_embeddings = _teacher_embeddings(task, task_type, num_negatives, mined, where)
  max_records = _as_int(task["max_records"], f"{where}.max_records")
  if max_records < 0:
    raise ConfigError(f"{where}.max_records must be >= 0 (0 = all records), got {max_records}")
  fields = _fields(task["fields"], task_type, corpus, where)
  if task_type == "retrieval" and num_negatives and not mined:
    fields["negatives"] = _in_record_negatives(corpus, fields, num_negatives, where)
  return TaskSpec(name=str(name), type=task_type, dataset=dataset, split=split, weight=_weight(task["weight"], where),
                  batch_size=_batch_size(task["batch_size"], default_batch_size, where), fields=fields,
                  num_negatives=num_negatives, mined=mined, max_records=max_records,
                  teacher_embeddings=teacher_embeddings)


def _in_record_negatives(corpus: corpora.Corpus, fields: dict[str, str], num_negatives: int, where: str) -> str:
  """The field of a retrieval task's in-record hard negatives (it has num_negatives > 0 and no mined set)."""
  if corpus.negatives is None:
    raise ConfigError(f"{where}.num_negatives={num_negatives} needs a mined hard-negative set: set {where}.mined to "
                      f"its name (in <data_dir>/{MINED_DIR}/<name>); or a dataset whose records hold their own "
                      "(a `negative(s)` field of `prepare files`); or num_negatives=0")
  if (fields["query"], fields["doc"]) != corpus.retrieval:
    raise ConfigError(f"{where}: the in-record negatives of {corpus.name!r} ({corpus.negatives!r}) belong to its "
                      f"{corpus.retrieval[0]!r} -> {corpus.retrieval[1]!r} pairs, but the task reads "
                      f"{fields['query']!r} -> {fields['doc']!r}; use those fields, a mined set, or num_negatives=0")
  return corpus.negatives


def resolve_tasks(data_config: ml_collections.ConfigDict, default_batch_size: int) -> dict[str, TaskSpec]:
  """Checks the structure of `data_config.tasks` (no record is read; the datasets of the data dir are listed) and
  returns name -> TaskSpec, sorted by name.

  Args:
    data_config: `config.data` with `tasks`.
    default_batch_size: the global batch size of tasks with batch_size 0 (config.train.batch_size).

  Raises:
    ConfigError: no tasks; an unknown task field, type, dataset, split or role; weight <= 0; a bad batch size,
      num_negatives, mined name, max_records or teacher_embeddings (a name; retrieval only; not with the records'
      own hard negatives).
  """
  tasks = data_config.get("tasks", None)
  if not isinstance(tasks, (Mapping, ml_collections.ConfigDict)) or not tasks:
    raise ConfigError(f"config.data.tasks is empty; add at least one text task, {_EXAMPLE}")
  data_dir = reading.data_dir(data_config)
  return {name: _resolve_task(name, tasks[name], default_batch_size, data_dir) for name in sorted(tasks)}


def check_fields(spec: TaskSpec, features: Any) -> dict[str, str]:
  """Checks the task's fields against the dataset's features; returns role -> field kind (`corpora.field_kind`).

  Raises:
    ConfigError: a field the dataset lacks, or of a kind the role cannot read.
  """
  kinds = {}
  for role, field in spec.fields.items():
    where = f"config.data.tasks.{spec.name}.fields.{role}"
    if field not in features:
      raise ConfigError(f"{where}={field!r}: dataset {spec.dataset!r} has no such field; its fields: "
                        f"{', '.join(features.keys())}")
    kind = corpora.field_kind(features[field])
    allowed = _ROLE_KINDS.get((spec.type, role), corpora.TEXT_KINDS)
    if kind not in allowed:
      raise ConfigError(f"{where}={field!r} is a {type(features[field]).__name__} ({kind}); a {spec.type} "
                        f"{role} must be one of: {', '.join(allowed)}")
    kinds[role] = kind
  return kinds


def label_negatives(spec: TaskSpec, num_classes: int) -> int:
  """H, the other label texts per row of a classification task with `num_classes` labels.

  Raises:
    ConfigError: fewer than 2 labels, or more negatives asked for than other labels.
  """
  if num_classes < 2:
    raise ConfigError(f"config.data.tasks.{spec.name}: classification needs at least 2 labels, "
                      f"{spec.dataset}.{spec.fields['label']} has {num_classes}")
  if spec.num_negatives > num_classes - 1:
    raise ConfigError(f"config.data.tasks.{spec.name}.num_negatives={spec.num_negatives} exceeds the "
                      f"{num_classes - 1} other labels of {spec.dataset}.{spec.fields['label']}; "
                      f"use at most {num_classes - 1} (0 = all)")
  return spec.num_negatives or num_classes - 1


def validate_tasks(data_config: ml_collections.ConfigDict, default_batch_size: int, batch_shards: int,
                   process_count: int) -> dict[str, TaskSpec]:
  """Checks `config.data.tasks` against the mesh, the processes and the prepared datasets; returns the tasks.

  Args:
    data_config: `config.data` with `tasks` (and `data_dir`, where the datasets are prepared).
    default_batch_size: config.train.batch_size (used by tasks with batch_size 0).
    batch_shards: data-parallel shards of the mesh; every task's global batch must divide by it.
    process_count: JAX processes; every task's global batch must divide by it.

  Returns:
    name -> TaskSpec, sorted by name: what `text_stream.make_text_train_dataset` takes.

  Raises:
    ConfigError: anything `resolve_tasks` rejects; a batch size the shards or processes do not divide; a field
      the dataset lacks or a role cannot read; a classification with fewer than 2 ClassLabel names, or more
      num_negatives than other labels.
    DataError: a task's dataset is not prepared (the message is the `prepare` command).
  """
  specs = resolve_tasks(data_config, default_batch_size)
  data_dir = reading.data_dir(data_config)
  for spec in specs.values():
    for what, count in (("data-parallel batch shards of the mesh", batch_shards), ("processes", process_count)):
      if spec.batch_size % int(count):
        raise ConfigError(f"config.data.tasks.{spec.name} has global batch size {spec.batch_size}, not divisible "
                          f"by the {count} {what}; use a multiple of {count}")
    features = sources.features(spec.dataset, data_dir)
    kinds = check_fields(spec, features)
    if spec.type == "classification" and kinds["label"] == "class":
      label_negatives(spec, features[spec.fields["label"]].num_classes)
  return specs
