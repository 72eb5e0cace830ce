"""A text embedding model: one shared BERT tower for queries, documents, hard negatives and labels.

tokens int32 [B, L] (0 = padding) -> BertEncoder -> pooling ("mean" over non-pad tokens, "cls" or "last" non-pad)
  -> optional Piccolo2 scaling layer (Dense hidden -> scaling_dim, with bias; Piccolo2 §3.2, for embeddings
     wider than the tower, e.g. with Matryoshka losses)  or  optional projection (Dense hidden -> embed_dim)
  -> L2 normalisation -> float32 [B, D].

The tower is a BERT initialised at random (`pretrained=""`, sizes from `bert`) or from a Hugging Face checkpoint
(`pretrained="minilm"` or a directory, see `models.pretrained`); then the model must use the checkpoint's own
tokenizer (`models.pretrained.load_tokenizer`). Load the weights with `pretrained_model_params` and put them
into freshly initialised params with `pretrained.merge_pretrained`. The config fields are `config_schema.TEXT_MODEL`.

A config's fields left to the checkpoint (`pooling=""`, `max_text_len=0`, no `embed_dim` / `scaling_dim`, empty
prefixes) take the checkpoint's sentence-transformers settings (`models.st_modules`): `resolve_config` fills them,
and `announce_config` prints what it read, once, where a run or an encoder starts.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from big_embed.errors import ConfigError
from big_embed.models import bert as bert_lib
from big_embed.models import dropout as dropout_lib
from big_embed.models import layers
from big_embed.models import pretrained as pretrained_lib
from big_embed.models import st_modules
from big_embed.models.kind import ModelKind
from big_embed.ops import l2_normalize

# The batch entries the model embeds, all with the same tower.
TEXT_INPUTS = ("query", "key", "hard_negatives", "label")
POOLINGS = ("mean", "cls", "last")
DEFAULT_MAX_TEXT_LEN = 128  # a random init's, or a checkpoint's without a sentence-transformers max_seq_length


def checkpoint_pipeline(model_config: ml_collections.ConfigDict) -> st_modules.Pipeline | None:
  """The pretrained checkpoint's sentence-transformers pipeline (None for a random init)."""
  if not model_config.get("pretrained", ""):
    return None
  return st_modules.read(pretrained_lib.resolve_pretrained(str(model_config.pretrained)))


def resolve_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`model_config` with the fields left to the checkpoint filled from it (a copy; idempotent).

  pooling "" -> the checkpoint's (mean for a random init or a checkpoint without sentence-transformers files);
  max_text_len 0 -> its max_seq_length, else 128; embed_dim / scaling_dim -> its Dense module (without / with
  bias); query_prefix / doc_prefix "" -> its query / document prompt.

  Raises:
    ConfigError: the config sets embed_dim or scaling_dim while the checkpoint has a Dense module of its own, or
      the checkpoint's sentence-transformers files are unreadable or unsupported (`st_modules.PretrainedError`).
  """
  c = ml_collections.ConfigDict(model_config.to_dict())
  pipe = checkpoint_pipeline(c) or st_modules.Pipeline()
  if not c.get("pooling", ""):
    c.pooling = pipe.pooling
  if not int(c.get("max_text_len", 0) or 0):
    c.max_text_len = int(pipe.max_seq_length or DEFAULT_MAX_TEXT_LEN)
  if pipe.dense is not None:
    own = {"embed_dim": pipe.dense.kernel.shape[1] if pipe.dense.bias is None else 0,
           "scaling_dim": pipe.dense.kernel.shape[1] if pipe.dense.bias is not None else 0}
    mine = {k: int(c.get(k, 0) or 0) for k in own}
    if any(mine.values()) and mine != own:
      raise ConfigError(f"config.model sets {mine} but the checkpoint {c.pretrained!r} has its own Dense module "
                        f"({own}); leave embed_dim and scaling_dim at 0 to use it")
    c.update(own)
  for field, prompt in (("query_prefix", pipe.query_prompt), ("doc_prefix", pipe.doc_prompt)):
    if not c.get(field, ""):
      c[field] = prompt
  return c


def announce_config(model_config: ml_collections.ConfigDict) -> None:
  """Prints what the pretrained checkpoint's files gave the model (nothing for a random init)."""
  pipe = checkpoint_pipeline(model_config)
  if pipe is not None:
    print(pipe.describe(repr(str(model_config.pretrained))), flush=True)
    if not pipe.normalize:
      print("  the checkpoint has no Normalize module: training normalises its embeddings (as every big_embed "
            "model); encode() returns them as the checkpoint does", flush=True)


def bert_config(model_config: ml_collections.ConfigDict, vocab_size: int) -> dict:
  """`BertEncoder` fields for `model_config` (the checkpoint's when `pretrained` is set).

  Raises:
    ConfigError: a bad field, or a vocabulary that does not match the checkpoint's.
  """
  c = model_config
  num_layers = int(c.get("num_layers", 0) or 0)
  if num_layers < 0:
    raise ConfigError(f"config.model.num_layers={num_layers} must be >= 0 (0 = all layers)")
  if c.get("pretrained", ""):
    path = pretrained_lib.resolve_pretrained(str(c.pretrained))
    kw = pretrained_lib.bert_kwargs(path, num_layers or None)  # config.json is read once (cached)
    if kw["vocab_size"] != vocab_size:
      raise ConfigError(f"the tokenizer has {vocab_size} tokens but the checkpoint {c.pretrained!r} has "
                        f"{kw['vocab_size']}; use the checkpoint's tokenizer (models.pretrained.load_tokenizer)")
  else:
    kw = dict(c.bert)
    unknown = set(kw) - {"hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                         "type_vocab_size", "layer_norm_eps"}
    if unknown:
      raise ConfigError(f"config.model.bert has unknown fields {sorted(unknown)}")
    kw["vocab_size"] = vocab_size
    if num_layers:
      kw["num_layers"] = num_layers
  max_text_len = int(c.get("max_text_len", 0) or 0)
  if max_text_len > kw.get("max_position_embeddings", 512):
    raise ConfigError(f"config.model.max_text_len={max_text_len} exceeds the model's "
                      f"{kw['max_position_embeddings']} positions; lower it")
  kw["dropout_rate"] = dropout_lib.check_rate(c.get("dropout", 0.0), "config.model.dropout")
  kw["dtype"] = jnp.dtype(c.get("dtype", "float32"))
  kw.update(layers.stack_fields(c))
  return kw


def output_dim(model_config: ml_collections.ConfigDict, hidden_size: int) -> int:
  """The embedding width: scaling_dim, else embed_dim, else the tower's hidden size."""
  return int(model_config.get("scaling_dim", 0) or model_config.get("embed_dim", 0) or hidden_size)


class TextEmbedder(nn.Module):
  """`encode_text(tokens [B, L]) -> [B, D]`; `__call__(batch) -> {input: embeddings}`; float32, unit norm."""

  config: ml_collections.ConfigDict  # config.model (config_schema.TEXT_MODEL)
  vocab_size: int

  def setup(self):
    c = self.config
    if c.get("pooling", "") not in POOLINGS:
      raise ConfigError(f"config.model.pooling={c.pooling!r} is unknown; use one of {POOLINGS}")
    embed_dim, scaling_dim = int(c.get("embed_dim", 0) or 0), int(c.get("scaling_dim", 0) or 0)
    if embed_dim < 0 or scaling_dim < 0 or (embed_dim and scaling_dim):
      raise ConfigError(f"config.model.embed_dim={embed_dim} and scaling_dim={scaling_dim}: set at most one of "
                        "them (> 0), the other 0")
    self.bert = bert_lib.BertEncoder(**bert_config(c, self.vocab_size), name="bert")
    if scaling_dim:
      self.scaling = nn.Dense(scaling_dim, use_bias=True, name="scaling",
                              kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                       ("embed", None)),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
    if embed_dim:
      self.projection = nn.Dense(embed_dim, use_bias=False, name="projection",
                                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                          ("embed", None)))

  def encode_text(self, tokens, rows=None):  # int32 [B, L] -> float32 [B, D]
    return l2_normalize(self.features(tokens, rows))

  def features(self, tokens, rows=None):  # int32 [B, L] -> float32 [B, D], not normalised
    """Pooled (and scaled / projected) features; a two-tower model projects these for its text side. `rows`: the
    tower's dropout RowKeys (None: no dropout)."""
    hidden = self.bert(tokens, rows)  # [B, L, H]
    pooling = self.config.pooling
    if pooling == "cls":
      pooled = hidden[:, 0].astype(jnp.float32)  # [B, H]
    elif pooling == "last":
      last = jnp.maximum(jnp.sum(tokens != 0, axis=1) - 1, 0)  # [B]: the last non-pad position
      pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)  # [B, H]
    else:
      w = (tokens != 0)[..., None].astype(jnp.float32)  # [B, L, 1]
      pooled = jnp.sum(hidden.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)
    if self.config.get("scaling_dim", 0):
      pooled = self.scaling(pooled)
    if self.config.get("embed_dim", 0):
      pooled = self.projection(pooled)
    return pooled

  def __call__(self, batch, row_ids=None):
    """Embeds each present entry of ("query", "key", "hard_negatives", "label") with the shared tower.

    Dropout is on when a "dropout" RNG is given to `apply` (training), row-keyed (`models.dropout`): row r's masks
    depend only on that RNG, the input's name and row_ids[r], so any split of the batch into chunks (each with its
    rows' ids) embeds every row as the whole batch does. Each input has its own masks (a query and its key with
    the same text still differ); hard negative h of row r has the id r * H + h.

    Args:
      batch: dict with int32 tokens query/key/label [N, L] and hard_negatives [N, H, L]; other keys are ignored.
      row_ids: int32 [N], the global index of each row, the same for every input (None: 0..N-1 for each input).

    Returns:
      dict with the same keys: [N, D] ([N, H, D] for hard_negatives), float32, unit norm.
    """
    out = {}
    call_key = dropout_lib.call_key(self)
    for site, key in enumerate(TEXT_INPUTS):
      if key not in batch:
        continue
      tokens = batch[key]
      rows = dropout_lib.row_keys(call_key, row_ids, tokens.shape[0], site)
      if key == "hard_negatives":
        b, h, length = tokens.shape
        flat = self.encode_text(tokens.reshape(b * h, length), dropout_lib.expand_rows(rows, h))  # [N * H, D]
        out[key] = flat.reshape(b, h, -1)
      else:
        out[key] = self.encode_text(tokens, rows)
    if not out:
      raise ValueError(f"the batch has none of the text inputs {TEXT_INPUTS}; it has {sorted(batch)}")
    return out


def example_batch(max_text_len: int) -> dict:
  """A one-row batch with the model's input shapes (for init and eval_shape)."""
  return {"query": jnp.zeros((1, max_text_len), jnp.int32), "key": jnp.zeros((1, max_text_len), jnp.int32)}


def build_text_model(model_config: ml_collections.ConfigDict, vocab_size: int) -> TextEmbedder:
  """The model of `config.model` (`resolve_config` applied); config errors are raised now, not at the first trace."""
  model_config = resolve_config(model_config)
  bert_config(model_config, vocab_size)
  return TextEmbedder(config=model_config, vocab_size=vocab_size)


def pretrained_model_params(model_config: ml_collections.ConfigDict) -> dict:
  """The checkpoint's part of a `TextEmbedder`'s params ({"bert": ...}, float32 NumPy, unboxed).

  The checkpoint's sentence-transformers Dense module, if it has one, is the projection (no bias) or scaling (with
  bias) layer; layers absent from the checkpoint are not in the tree: `merge_pretrained` puts this into freshly
  initialised params. With `scan_layers` the layers are stacked (`layers.stack_layers`). The tree
  sits at the level of the "params" collection's content.

  Raises:
    ConfigError: `pretrained` is empty, or the checkpoint is missing / does not fit (`PretrainedError`).
  """
  if not model_config.get("pretrained", ""):
    raise ConfigError("config.model.pretrained is empty: there are no pretrained weights to load")
  path = pretrained_lib.resolve_pretrained(model_config.pretrained)
  num_layers = int(model_config.get("num_layers", 0) or 0) or None
  bert = pretrained_lib.load_bert_params(path, num_layers)
  params = {"bert": layers.to_layout(bert, layers.stack_fields(model_config)["scan_layers"])}
  dense = st_modules.read(path).dense
  if dense is not None:
    params["projection" if dense.bias is None else "scaling"] = (
        {"kernel": dense.kernel} if dense.bias is None else {"kernel": dense.kernel, "bias": dense.bias})
  return params


KIND = ModelKind(
    name="text", build=build_text_model, example_batch=lambda c: example_batch(resolve_config(c).max_text_len),
    outputs=TEXT_INPUTS, resolve=resolve_config, announce=announce_config,
    pretrained_source=lambda c: c.get("pretrained", ""), pretrained_params=pretrained_model_params,
    tokenizer_source=lambda c: c.get("tokenizer", "") or c.get("pretrained", "") or pretrained_lib.MINILM)
