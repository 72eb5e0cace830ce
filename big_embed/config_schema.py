"""The config schema: every field of a run's config with its default, a one-line description and, for enumerated
fields, its choices. Recipes start from `base_config(kind)` and change only what differs.

    config.seed, config.mesh, config.sharding_rules, config.eval_batch_size   run-wide fields (TOP, MESH)
    config.train                                                             TRAIN
    config.model   (config.model.type picks the kind)                        TWO_TOWER_MODEL | TEXT_MODEL
    config.data    (config.data.tasks: name -> TEXT_TASK)                    DATA, TEXT_TASK
    config.teacher                                                           TEACHER
    config.loss    (the loss's own fields, declared by the loss)             see `big_embed.losses`
    config.evals   (name -> evaluator settings, checked by the evaluator)    see `big_embed.evaluate`

`validate(config)` rejects fields the schema does not have (with the closest name) and values outside a field's
choices, in one line each. This module imports only `ml_collections`, so loading a recipe loads no JAX.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from big_embed.errors import ConfigError


class Field(NamedTuple):
  default: Any
  help: str
  choices: tuple[Any, ...] | None = None


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
    "seed": Field(0, "seeds the parameter init, the dropout keys and the input stream"),
    "eval_batch_size": Field(512, "texts or images per evaluation batch (all devices together)"),
    "sharding_rules": Field(SHARDING_RULES, "logical parameter axis -> mesh axis (None: replicated)"),
}
MESH = {
    "data": Field(-1, "data-parallel devices (-1: the devices the other axes leave)"),
    "fsdp": Field(1, "devices the batch and the parameters' embed axis are split over"),
    "tensor": Field(1, "devices the MLP, attention heads and vocabulary are split over"),
}
TRAIN = {
    "batch_size": Field(256, "global batch size: every process and device together"),
    "steps": Field(500, "optimizer updates in the whole run"),
    "learning_rate": Field(1e-3, "peak learning rate (linear warmup, then cosine decay)"),
    "warmup_steps": Field(50, "steps of linear warmup from 0"),
    "final_lr_fraction": Field(0.0, "learning rate at the last step, as a fraction of the peak"),
    "weight_decay": Field(0.1, "AdamW decay of the model's matrices (never norms, biases or loss params)"),
    "b1": Field(0.9, "Adam beta1"),
    "b2": Field(0.98, "Adam beta2"),
    "grad_clip_norm": Field(1.0, "clip the global gradient norm to this (0: no clipping)"),
    "embed_chunk_size": Field(0, "> 0: exact gradient caching, the towers embed this many rows per device at a "
                              "time (activation memory of one chunk; the loss still sees the whole batch); 0: off"),
    "log_every": Field(25, "steps between metric records (metrics.jsonl, TensorBoard)"),
    "eval_every": Field(250, "steps between evaluations (and one at the end)"),
    "checkpoint_every": Field(100, "steps between checkpoints (and one at the end)"),
    "keep_checkpoints": Field(2, "newest checkpoints kept"),
}
_TOWER = {
    "width": Field(96, "hidden width"),
    "depth": Field(4, "Transformer blocks"),
    "num_heads": Field(4, "attention heads"),
    "mlp_dim": Field(384, "MLP hidden width"),
    "dropout": Field(0.0, "dropout rate (0 <= rate < 1) on the attention and MLP outputs while training"),
    "attention_dropout": Field(0.0, "dropout rate (0 <= rate < 1) on the attention probabilities while training"),
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
    "image_size": Field(32, "image side in pixels (images are resized to it)"),
    "patch_size": Field(8, "ViT patch side in pixels"),
    "max_text_len": Field(16, "tokens per text, [CLS]/[SEP] included"),
    "embed_dim": Field(128, "width of the shared embedding space (both projections)"),
    "dtype": Field("float32", "compute dtype of the towers; params and embeddings stay float32", DTYPES),
    "vision": dict(_TOWER),
    "text": {**_TOWER, "width": Field(128, "hidden width"), "depth": Field(2, "Transformer blocks"),
             "mlp_dim": Field(512, "MLP hidden width")},
    "text_pretrained": Field("", "start the text side from a BERT checkpoint ('minilm' or a Hugging Face "
                             "directory; '' = the Transformer above, random init); text.dropout is its dropout"),
    "text_pretrained_layers": Field(0, "layers of text_pretrained to keep (0 = all)"),
    **_LAYER_STACK,
}
TEXT_MODEL = {
    "type": TWO_TOWER_MODEL["type"]._replace(default="text"),
    "pretrained": Field("", "BERT checkpoint to start from: 'minilm', a Hugging Face directory, or '' (random init "
                        "with the `bert` sizes)"),
    "num_layers": Field(0, "BERT layers to keep (0 = all of the checkpoint's, or bert.num_layers)"),
    "bert": {
        "hidden_size": Field(384, "hidden width (random init only)"),
        "num_layers": Field(6, "layers (random init only)"),
        "num_heads": Field(12, "attention heads (random init only)"),
        "intermediate_size": Field(1536, "MLP hidden width (random init only)"),
        "max_position_embeddings": Field(512, "positions (random init only)"),
    },
    "tokenizer": Field("", "tokenizer.json source: '' = the pretrained model's (MiniLM's for a random init), or "
                       "'minilm' / a directory / a text dataset of the data dir (the one `prepare files` trained)"),
    "pooling": Field("", "'mean' over non-pad tokens, 'cls' (the first token), 'last' (the last non-pad token), or "
                     "'' = the pretrained checkpoint's (its sentence-transformers Pooling; 'mean' without one)",
                     POOLINGS),
    "embed_dim": Field(0, "> 0: a projection Dense hidden -> embed_dim (no bias); 0: none, or the pretrained "
                       "checkpoint's Dense module (without bias) when it has one"),
    "scaling_dim": Field(0, "> 0: Piccolo2's scaling layer, a Dense hidden -> scaling_dim (with bias); 0: none, or "
                         "the pretrained checkpoint's Dense module (with bias) when it has one"),
    "max_text_len": Field(0, "tokens per text, [CLS]/[SEP] included (at most the model's positions); 0 = the "
                          "pretrained checkpoint's sentence-transformers max_seq_length, else 128"),
    "dropout": Field(0.0, "BERT dropout rate while training (embeddings, attention, block outputs)"),
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
                                 "batch['score'] (matching pairs for pair losses)"),
    "worker_count": Field(0, "Grain worker processes (> 0 needs absl flags parsed; ~8 s to start)"),
    "num_threads": Field(4, "threads reading records in each process"),
    "prefetch_buffer_size": Field(8, "batches read ahead"),
}
TEXT_TASK = {
    "type": Field("retrieval", "what the batches hold and which losses can train on them", TASK_TYPES),
    "dataset": Field("", "a prepared text corpus (`python -m big_embed.data.prepare NAME`), or a dataset of the "
                     "data dir (`prepare files --name NAME`)"),
    "split": Field("train", "the split to train on"),
    "weight": Field(1.0, "> 0: the task's share of steps is weight / the sum of the weights"),
    "batch_size": Field(0, "the task's global batch size (0 = config.train.batch_size)"),
    "fields": {role: Field("", f"record field read as the {role!r} role ('' = the dataset's default for the task "
                           f"type, else the field {role!r})") for role in TASK_ROLES},
    "num_negatives": Field(0, "retrieval: hard negatives per row (from `mined`, else the records' own negatives); "
                           "classification: other label texts per row (0 = all)"),
    "mined": Field("", "name of a mined hard-negative set in <data_dir>/mined/ (retrieval only; '' = none)"),
    "max_records": Field(0, "> 0: use only the split's first max_records records (0 = all)"),
}
TEACHER = {
    "workdir": Field("", "a finished run whose newest checkpoint is the frozen teacher ('' = no teacher)"),
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
  c.loss = ml_collections.ConfigDict({"name": "clip"})
  c.evals = ml_collections.ConfigDict()
  return c


def _suggest(name: str, known) -> str:
  close = difflib.get_close_matches(name, list(known), n=1)
  return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"


def _check(values: Any, schema: Mapping[str, Any], where: str) -> None:
  if not isinstance(values, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where} must be a ConfigDict of fields, got {values!r}")
  for name in values.keys():
    if name not in schema:
      raise ConfigError(f"{where}.{name} is not a config field{_suggest(name, schema)}")
    entry, value = schema[name], values[name]
    if not isinstance(entry, Field):
      _check(value, entry, f"{where}.{name}")
    elif entry.choices is not None and value not in entry.choices:
      raise ConfigError(f"{where}.{name}={value!r} is not one of {', '.join(map(repr, entry.choices))}"
                        f"{_suggest(str(value), [str(c) for c in entry.choices])}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every schema-typed section of `config`: no unknown field, enumerated fields within their choices.

  Raises:
    ConfigError: one line naming the field (e.g. "config.model.dtype='bf16' is not one of 'float32',
      'bfloat16'; did you mean 'bfloat16'?").
  """
  top = {**TOP, "mesh": MESH, "train": TRAIN, "data": DATA, "teacher": TEACHER,
         "model": None, "loss": None, "evals": None}
  for name in config.keys():
    if name not in top:
      raise ConfigError(f"config.{name} is not a config field{_suggest(name, top)}")
  kind = config.model.get("type", "two_tower")
  _check({"type": kind}, {"type": TWO_TOWER_MODEL["type"]}, "config.model")
  sections = {"mesh": MESH, "train": TRAIN, "data": DATA, "teacher": TEACHER, "model": MODELS[kind]}
  _check({k: v for k, v in config.items() if k in TOP}, TOP, "config")
  for name, schema in sections.items():
    if name in config:
      _check(config[name], schema, f"config.{name}")
  for name, task in (config.data.get("tasks") or {}).items():
    _check(task, TEXT_TASK, f"config.data.tasks.{name}")
