"""The config schema: every field of a run's config with its default, a one-line description and, for enumerated
fields, its choices, for numeric ones the numbers allowed (`Range`). Recipes start from `base_config(kind)` and
change only what differs.

    config.seed, config.mesh, config.sharding_rules, config.eval_batch_size   run-wide fields (TOP, MESH)
    config.train                                                             TRAIN
    config.model   (config.model.type picks the kind)                        TWO_TOWER_MODEL | TEXT_MODEL
    config.data    (config.data.tasks: name -> TEXT_TASK)                    DATA, TEXT_TASK
    config.teacher                                                           TEACHER
    config.distributed (multi-process runs: timeouts, coordinator address)    DISTRIBUTED
    config.loss    (the loss's own fields, declared by the loss)             see `big_embed.losses`
    config.evals   (name -> evaluator settings, checked by the evaluator)    see `big_embed.evaluate`

`validate(config)` rejects fields the schema does not have (with the closest name), values of another type than the
field's default, values outside a field's choices or range, and settings that contradict each other (a patch size
that does not divide the image size), in one line each naming the field, its value and what is allowed. This
module imports only `ml_collections`, so loading a recipe loads no JAX.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from big_embed.errors import ConfigError


class Range(NamedTuple):
  """The numbers a numeric field allows: `low` <= value <= `high` (strict where `low_open` / `high_open`; None: no
  bound), finite; an int when `integer`; `also`: values allowed outside the range (e.g. -1 = "the rest")."""

  low: float | None = None
  high: float | None = None
  integer: bool = False
  low_open: bool = False
  high_open: bool = False
  also: tuple[Any, ...] = ()

  def __str__(self) -> str:
    kind = "an integer" if self.integer else "a finite number"
    if self.low is not None and self.high is not None:
      bounds = f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    elif self.low is not None:
      bounds = f" {'>' if self.low_open else '>='} {self.low:g}"
    elif self.high is not None:
      bounds = f" {'<' if self.high_open else '<='} {self.high:g}"
    else:
      bounds = ""
    return " or ".join([*map(repr, self.also), kind + bounds])

  def allows(self, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      return False
    if value in self.also:
      return True
    if (self.integer and not isinstance(value, numbers.Integral)) or not math.isfinite(value):
      return False
    low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
    high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
    return low_ok and high_ok


class HostPort(NamedTuple):
  """An address field: '' (the default behaviour) or "host:port" with a port in [1, 65535]."""

  def __str__(self) -> str:
    return "'' or host:port (port in [1, 65535], e.g. '0.0.0.0:1234')"

  def allows(self, value: Any) -> bool:
    if not isinstance(value, str):
      return False
    host, sep, port = value.rpartition(":")
    return not value or (bool(sep) and bool(host.strip("[]")) and port.isdigit() and 1 <= int(port) <= 65535)


def ints(low: int, high: int | None = None, also: tuple[int, ...] = ()) -> Range:
  """Integers in [low, high] (or >= low), and the values `also`."""
  return Range(low, high, integer=True, also=also)


POSITIVE = Range(0, low_open=True)  # a finite number > 0
NON_NEGATIVE = Range(0)  # a finite number >= 0
RATE = Range(0, 1, high_open=True)  # a dropout rate or an Adam beta: [0, 1)
FRACTION = Range(0, 1)  # [0, 1]


class Field(NamedTuple):
  """A config field: its default (whose type the value must have), a one-line help, and for an enumerated field
  its `choices`, for a numeric one its `Range` (an address: `HostPort`)."""

  default: Any
  help: str
  choices: tuple[Any, ...] | None = None
  check: Range | HostPort | None = None


MODEL_TYPES = ("two_tower", "text")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "block", "dots")
POOLINGS = ("", "mean", "cls", "last")
TASK_TYPES = ("retrieval", "sts", "classification", "multilabel")
# Record-field roles a text task reads (config.data.tasks.<name>.fields.<role> names the record field).
TASK_ROLES = ("query", "doc", "text_a", "text_b", "score", "text", "label")
# Logical parameter axis -> mesh axis. FSDP shards the model width; tensor parallelism the MLP, heads, vocabulary.
SHARDING_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"), ("kv", None))

TOP = {
    "seed": Field(0, "seeds the parameter init, the dropout keys and the input stream", check=ints(0)),
    "eval_batch_size": Field(512, "texts or images per evaluation batch (all devices together)", check=ints(1)),
    "sharding_rules": Field(SHARDING_RULES, "logical parameter axis -> mesh axis (None: replicated)"),
}
MESH = {
    "data": Field(-1, "data-parallel devices (-1: the devices the other axes leave)", check=ints(1, also=(-1,))),
    "fsdp": Field(1, "devices the batch and the parameters' embed axis are split over", check=ints(1)),
    "tensor": Field(1, "devices the MLP, attention heads and vocabulary are split over", check=ints(1)),
}
TRAIN = {
    "batch_size": Field(256, "global batch size: every process and device together", check=ints(1)),
    "steps": Field(500, "optimizer updates in the whole run", check=ints(1)),
    "learning_rate": Field(1e-3, "peak learning rate (linear warmup, then cosine decay)", check=POSITIVE),
    "warmup_steps": Field(50, "steps of linear warmup from 0", check=ints(0)),
    "final_lr_fraction": Field(0.0, "learning rate at the last step, as a fraction of the peak", check=FRACTION),
    "weight_decay": Field(0.1, "AdamW decay of the model's matrices (never norms, biases or loss params)",
                          check=NON_NEGATIVE),
    "b1": Field(0.9, "Adam beta1", check=RATE),
    "b2": Field(0.98, "Adam beta2", check=RATE),
    "grad_clip_norm": Field(1.0, "clip the global gradient norm to this (0: no clipping)", check=NON_NEGATIVE),
    "embed_chunk_size": Field(0, "> 0: exact gradient caching, the towers embed this many rows per device at a "
                              "time (activation memory of one chunk; the loss still sees the whole batch); 0: off",
                              check=ints(0)),
    "log_every": Field(25, "steps between metric records (metrics.jsonl, TensorBoard)", check=ints(1)),
    "eval_every": Field(250, "steps between evaluations (and one at the end)", check=ints(1)),
    "checkpoint_every": Field(100, "steps between checkpoints (and one at the end)", check=ints(1)),
    "keep_checkpoints": Field(2, "newest checkpoints kept", check=ints(1)),
    "max_bad_steps": Field(10, "consecutive steps with a non-finite loss, gradient norm or update (each skipped: "
                           "parameters and optimizer state unchanged) after which the run stops", check=ints(1)),
}
# Multi-process runs (jax.distributed): read before JAX starts, by `parallel/multihost.initialize`.
DISTRIBUTED = {
    "initialization_timeout_s": Field(300, "seconds every process waits for all the others to join",
                                      check=ints(1)),
    "heartbeat_timeout_s": Field(100, "seconds without a heartbeat after which a process counts as lost and every "
                                 "other process stops with an error naming it", check=ints(1)),
    "coordinator_bind_address": Field("", "address:port process 0's coordination service listens on ('' = "
                                      "loopback for a coordinator on this machine, else all interfaces on the "
                                      "coordinator's port)", check=HostPort()),
}
_TOWER = {
    "width": Field(96, "hidden width", check=ints(1)),
    "depth": Field(4, "Transformer blocks", check=ints(1)),
    "num_heads": Field(4, "attention heads", check=ints(1)),
    "mlp_dim": Field(384, "MLP hidden width", check=ints(1)),
    "dropout": Field(0.0, "dropout rate (0 <= rate < 1) on the attention and MLP outputs while training", check=RATE),
    "attention_dropout": Field(0.0, "dropout rate (0 <= rate < 1) on the attention probabilities while training",
                               check=RATE),
}
# The layer stack of every tower (ViT, text Transformer, BERT): models/layers.py.
_LAYER_STACK = {
    "remat": Field("none", "rematerialise in the backward: 'none', 'block' (keep only each block's input) or "
                   "'dots' (keep the blocks' weight-matmul outputs, recompute the rest); on CPU it saves memory "
                   "only with scan_layers", REMATS),
    "scan_layers": Field(False, "nn.scan over the blocks (params stacked on a leading 'layers' axis): faster "
                         "compiles; checkpoints resume only with the same setting", (False, True)),
}
TWO_TOWER_MODEL = {
    "type": Field("two_tower", "model kind: 'two_tower' (image-text CLIP) or 'text' (one shared BERT tower)",
                  MODEL_TYPES),
    "image_size": Field(32, "image side in pixels (images are resized to it)", check=ints(1)),
    "patch_size": Field(8, "ViT patch side in pixels", check=ints(1)),
    "max_text_len": Field(16, "tokens per text, [CLS]/[SEP] included", check=ints(2)),
    "embed_dim": Field(128, "width of the shared embedding space (both projections)", check=ints(1)),
    "dtype": Field("float32", "compute dtype of the towers; params and embeddings stay float32", DTYPES),
    "vision": dict(_TOWER),
    "text": {**_TOWER, "width": _TOWER["width"]._replace(default=128), "depth": _TOWER["depth"]._replace(default=2),
             "mlp_dim": _TOWER["mlp_dim"]._replace(default=512)},
    "text_pretrained": Field("", "start the text side from a BERT checkpoint ('minilm' or a Hugging Face "
                             "directory; '' = the Transformer above, random init); text.dropout is its dropout"),
    "text_pretrained_layers": Field(0, "layers of text_pretrained to keep (0 = all)", check=ints(0)),
    **_LAYER_STACK,
}
TEXT_MODEL = {
    "type": TWO_TOWER_MODEL["type"]._replace(default="text"),
    "pretrained": Field("", "BERT checkpoint to start from: 'minilm', a Hugging Face directory, or '' (random init "
                        "with the `bert` sizes)"),
    "num_layers": Field(0, "BERT layers to keep (0 = all of the checkpoint's, or bert.num_layers)", check=ints(0)),
    "bert": {
        "hidden_size": Field(384, "hidden width (random init only)", check=ints(1)),
        "num_layers": Field(6, "layers (random init only)", check=ints(1)),
        "num_heads": Field(12, "attention heads (random init only)", check=ints(1)),
        "intermediate_size": Field(1536, "MLP hidden width (random init only)", check=ints(1)),
        "max_position_embeddings": Field(512, "positions (random init only)", check=ints(2)),
    },
    "tokenizer": Field("", "tokenizer.json source: '' = the pretrained model's (MiniLM's for a random init), or "
                       "'minilm' / a directory / a text dataset of the data dir (the one `prepare files` trained)"),
    "pooling": Field("", "'mean' over non-pad tokens, 'cls' (the first token), 'last' (the last non-pad token), or "
                     "'' = the pretrained checkpoint's (its sentence-transformers Pooling; 'mean' without one)",
                     POOLINGS),
    "embed_dim": Field(0, "> 0: a projection Dense hidden -> embed_dim (no bias); 0: none, or the pretrained "
                       "checkpoint's Dense module (without bias) when it has one", check=ints(0)),
    "scaling_dim": Field(0, "> 0: Piccolo2's scaling layer, a Dense hidden -> scaling_dim (with bias); 0: none, or "
                         "the pretrained checkpoint's Dense module (with bias) when it has one", check=ints(0)),
    "max_text_len": Field(0, "tokens per text, [CLS]/[SEP] included (at most the model's positions); 0 = the "
                          "pretrained checkpoint's sentence-transformers max_seq_length, else 128",
                          check=ints(2, also=(0,))),
    "dropout": Field(0.0, "BERT dropout rate while training (embeddings, attention, block outputs)", check=RATE),
    "dtype": TWO_TOWER_MODEL["dtype"],
    **_LAYER_STACK,
    "query_prefix": Field("", "put before every query text, e.g. 'query: ' ('' = the pretrained checkpoint's "
                          "sentence-transformers query prompt, if any)"),
    "doc_prefix": Field("", "put before every document, key, label and hard-negative text, e.g. 'passage: ' ('' = "
                        "the pretrained checkpoint's document prompt, if any)"),
}
MODELS = {"two_tower": TWO_TOWER_MODEL, "text": TEXT_MODEL}
DATA = {
    "data_dir": Field("", "prepared datasets ('' = $BIG_EMBED_DATA_DIR, else ~/.cache/big_embed/datasets)"),
    "mixture": Field({}, "image-text training: prepared dataset -> sampling weight"),
    "tasks": Field({}, "text training: task name -> config_utils.text_task(...) (TEXT_TASK)"),
    "mismatched_fraction": Field(0.0, "image-text: share of captions swapped within each batch, with a 0/1 "
                                 "batch['score'] (matching pairs for pair losses)", check=FRACTION),
    "worker_count": Field(0, "Grain worker processes (> 0 needs absl flags parsed; ~8 s to start)", check=ints(0)),
    "num_threads": Field(4, "threads reading records in each process", check=ints(1)),
    "prefetch_buffer_size": Field(8, "batches read ahead", check=ints(1)),
}
TEXT_TASK = {
    "type": Field("retrieval", "what the batches hold and which losses can train on them", TASK_TYPES),
    "dataset": Field("", "a prepared text corpus (`python -m big_embed.data.prepare NAME`), or a dataset of the "
                     "data dir (`prepare files --name NAME`)"),
    "split": Field("train", "the split to train on"),
    "weight": Field(1.0, "> 0: the task's share of steps is weight / the sum of the weights", check=POSITIVE),
    "batch_size": Field(0, "the task's global batch size (0 = config.train.batch_size)", check=ints(0)),
    "fields": {role: Field("", f"record field read as the {role!r} role ('' = the dataset's default for the task "
                           f"type, else the field {role!r})") for role in TASK_ROLES},
    "num_negatives": Field(0, "retrieval: hard negatives per row (from `mined`, else the records' own negatives); "
                           "classification: other label texts per row (0 = all)", check=ints(0)),
    "mined": Field("", "name of a mined hard-negative set in <data_dir>/mined/ (retrieval only; '' = none)"),
    "max_records": Field(0, "> 0: use only the split's first max_records records (0 = all)", check=ints(0)),
    "teacher_embeddings": Field("", "name of precomputed teacher embeddings in <data_dir>/teacher_embeddings/ "
                                "(`python -m big_embed.embed_teacher`; retrieval only): batches carry teacher_query, "
                                "teacher_key, teacher_hard_negatives ('' = none)"),
}
TEACHER = {
    "workdir": Field("", "a finished run whose newest checkpoint is the frozen teacher ('' = no teacher)"),
    "pretrained": Field("", "or: a pretrained text model, whole ('minilm' or a BERT checkpoint directory), as the "
                        "frozen teacher ('' = none); at most one of workdir and pretrained"),
    "outputs": Field({"image": "teacher_image", "text": "teacher_text"},
                     "teacher output -> the batch key its embeddings are added under"),
}
def _defaults(schema: Mapping[str, Any]) -> ml_collections.ConfigDict:
  out = {}
  for name, entry in schema.items():
    if isinstance(entry, Field):
      value = entry.default
      out[name] = ml_collections.ConfigDict(dict(value)) if isinstance(value, dict) else value
    else:
      out[name] = _defaults(entry)
  return ml_collections.ConfigDict(out)


def model_defaults(kind: str = "two_tower") -> ml_collections.ConfigDict:
  """`config.model` of model kind `kind` ("two_tower" or "text") with every field at its default."""
  if kind not in MODELS:
    raise ConfigError(f"config.model.type={kind!r} is unknown; use one of {MODEL_TYPES}")
  return _defaults(MODELS[kind])


def text_task_defaults() -> ml_collections.ConfigDict:
  return _defaults(TEXT_TASK)


def teacher_defaults() -> ml_collections.ConfigDict:
  return _defaults(TEACHER)


def base_config(kind: str = "two_tower") -> ml_collections.ConfigDict:
  """A whole run config with every schema field at its default; `loss` and `evals` are empty."""
  c = _defaults(TOP)
  c.mesh = _defaults(MESH)
  c.train = _defaults(TRAIN)
  c.model = model_defaults(kind)
  c.data = _defaults(DATA)
  c.teacher = teacher_defaults()
  c.distributed = _defaults(DISTRIBUTED)
  c.loss = ml_collections.ConfigDict({"name": "clip"})
  c.evals = ml_collections.ConfigDict()
  return c


def _show(value: Any) -> str:
  """A one-line repr (a ConfigDict's own spans lines)."""
  return repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)


def _suggest(name: str, known) -> str:
  close = difflib.get_close_matches(name, list(known), n=1)
  return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"


def _check_field(value: Any, entry: Field, where: str) -> None:
  """One field's value against its type (that of its default), choices and range."""
  default = entry.default
  if entry.check is not None:
    if not entry.check.allows(value):
      number = isinstance(value, numbers.Real) and not isinstance(value, bool)
      raise ConfigError(f"{where} must be {entry.check}, got {_show(value)}" + ("" if number else
                                                                          f" (a {type(value).__name__})"))
  elif isinstance(default, tuple) and not isinstance(value, (tuple, list)):
    raise ConfigError(f"{where} must be a tuple (default {default!r}), got {_show(value)}")
  elif isinstance(default, (bool, str)) and type(value) is not type(default):
    raise ConfigError(f"{where} must be a {type(default).__name__} (default {default!r}), got {_show(value)} (a "
                      f"{type(value).__name__})")
  if entry.choices is not None and value not in entry.choices:
    raise ConfigError(f"{where}={_show(value)} is not one of {', '.join(map(repr, entry.choices))}"
                      f"{_suggest(str(value), [str(c) for c in entry.choices])}")


def _check(values: Any, schema: Mapping[str, Any], where: str) -> None:
  if not isinstance(values, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a ConfigDict of fields, got {values!r}")
  for name in values.keys():
    if name not in schema:
      raise ConfigError(f"{where}.{name} is not a config field{_suggest(name, schema)}")
    entry, value = schema[name], values[name]
    if isinstance(entry, Field):
      _check_field(value, entry, f"{where}.{name}")
    else:
      _check(value, entry, f"{where}.{name}")


def check_name(name: Any, where: str) -> str:
  """`name` if it can be one path component (a dataset, a task, a mined set): a non-empty string without path
  separators, not '.' or '..'.

  Raises:
    ConfigError: naming `where`.
  """
  if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
    raise ConfigError(f"{where}: {name!r} is not a valid name; use a non-empty name without '/', '\\' or '..'")
  return name


def _check_mapping(values: Any, where: str, check_value) -> None:
  if not isinstance(values, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a dict, got {values!r}")
  for key, value in values.items():
    check_name(key, where)
    check_value(value, f"{where}.{key}")


def _check_positive_weight(value: Any, where: str) -> None:
  _check_field(value, Field(1.0, "a sampling weight", check=POSITIVE), where)


def _check_batch_key(value: Any, where: str) -> None:
  if not isinstance(value, str) or not value:
    raise ConfigError(f"{where}={_show(value)} must be a non-empty batch key")


def _check_model(model: ml_collections.ConfigDict, kind: str) -> None:
  """Settings of config.model that contradict each other."""
  def divides(part: str, whole: str, a: int, b: int) -> None:
    if b % a:
      raise ConfigError(f"config.model.{part}={a} does not divide config.model.{whole}={b}; pick sizes where it "
                        "does")
  if kind == "two_tower":
    divides("patch_size", "image_size", model.get("patch_size", 8), model.get("image_size", 32))
    for tower in ("vision", "text"):
      t = model.get(tower) or {}
      divides(f"{tower}.num_heads", f"{tower}.width", t.get("num_heads", 4), t.get("width", 1))
  elif not model.get("pretrained"):
    bert = model.get("bert") or {}
    divides("bert.num_heads", "bert.hidden_size", bert.get("num_heads", 12), bert.get("hidden_size", 384))
    if model.get("max_text_len", 0) > bert.get("max_position_embeddings", 512):
      raise ConfigError(f"config.model.max_text_len={model.max_text_len} exceeds config.model.bert."
                        f"max_position_embeddings={bert.get('max_position_embeddings', 512)}; lower it or raise "
                        "the positions")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every schema-typed section of `config`: no unknown field, each value of its field's type and within
  its choices or range, names that become paths valid, the model's sizes consistent. Needs no JAX.

  Raises:
    ConfigError: one line naming the field, its value and what is allowed (e.g. "config.model.dtype='bf16' is
      not one of 'float32', 'bfloat16'; did you mean 'bfloat16'?", "config.train.b1 must be a finite number in
      [0, 1), got 1.5").
  """
  top = {**TOP, "mesh": MESH, "train": TRAIN, "data": DATA, "teacher": TEACHER, "distributed": DISTRIBUTED,
         "model": None, "loss": None, "evals": None}
  for name in config.keys():
    if name not in top:
      raise ConfigError(f"config.{name} is not a config field{_suggest(name, top)}")
  model = config.get("model")
  if not isinstance(model, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"config.model must be a ConfigDict of fields (config_utils.base_config(kind)), got {model!r}")
  kind = model.get("type", "two_tower")
  _check({"type": kind}, {"type": TWO_TOWER_MODEL["type"]}, "config.model")
  sections = {"mesh": MESH, "train": TRAIN, "data": DATA, "teacher": TEACHER, "distributed": DISTRIBUTED,
              "model": MODELS[kind]}
  _check({k: v for k, v in config.items() if k in TOP}, TOP, "config")
  for name, schema in sections.items():
    if name in config:
      _check(config[name], schema, f"config.{name}")
  data = config.get("data") or {}
  _check_mapping(data.get("mixture") or {}, "config.data.mixture", _check_positive_weight)
  _check_mapping(data.get("tasks") or {}, "config.data.tasks",
                 lambda task, where: _check(task, TEXT_TASK, where))
  teacher = config.get("teacher") or {}
  _check_mapping(teacher.get("outputs") or {}, "config.teacher.outputs", _check_batch_key)
  if teacher.get("workdir") and teacher.get("pretrained"):
    raise ConfigError(f"config.teacher.workdir={teacher['workdir']!r} and config.teacher.pretrained="
                      f"{teacher['pretrained']!r} are both set; the teacher is one of them: clear the other")
  stored = [name for name, task in (data.get("tasks") or {}).items() if task.get("teacher_embeddings")]
  if stored and (teacher.get("workdir") or teacher.get("pretrained")):
    raise ConfigError(f"config.data.tasks.{stored[0]}.teacher_embeddings is set and so is config.teacher: the "
                      "batches' teacher keys come from one of them; clear config.teacher (precomputed) or the task's "
                      "teacher_embeddings (in the step)")
  for rule in config.get("sharding_rules", ()):  # each axis name is checked against the mesh (parallel/sharding)
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ConfigError(f"config.sharding_rules has {_show(rule)}; each rule is a pair (logical axis, mesh axis or "
                        "None)")
  _check_model(model, kind)
  evals = config.get("evals")
  if evals is not None and not isinstance(evals, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"config.evals must map result names to evaluator settings, got {evals!r}")
  for name, settings in (evals or {}).items():
    check_name(name, "config.evals")
    if not isinstance(settings, (Mapping, ml_collections.ConfigDict)) or not isinstance(settings.get("type"), str):
      raise ConfigError(f"config.evals.{name} must be evaluator settings with a `type`, e.g. "
                        f"dict(type='retrieval', dataset='emoji', split='test'); got {_show(settings)}")
