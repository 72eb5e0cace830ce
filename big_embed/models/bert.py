"""A BERT encoder (post-LayerNorm) numerically equal to Hugging Face's `BertModel` without its pooler.

Layout, per layer:  a = LN(x + Dropout(Attn(x)));  x = LN(a + Dropout(W2 gelu(W1 a)))  (GELU with exact erf).
Embeddings: word + absolute position + token type 0, then LayerNorm and dropout. Token id 0 is padding: padded
keys are masked out of every attention (padded query rows are still computed, as in Hugging Face).

Parameters carry the project's logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`), so
`parallel.sharding` shards them for FSDP / tensor parallelism. `models.pretrained.load_bert_params` maps a
Hugging Face checkpoint onto this exact tree (unrolled; `models.layers.stack_layers` turns it into the scanned one).
Dropout is row-keyed (`models.dropout`): a row's masks do not depend on the other rows of the batch.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from big_embed.models import dropout as dropout_lib
from big_embed.models import layers
from big_embed.models import transformer

Dtype = jnp.dtype
INITIALIZER_RANGE = 0.02  # BERT's normal(0.02) initialisation of every matrix and embedding
_EMBEDDINGS, _LAYERS = 0, 1  # dropout sites of the encoder (folded into its RowKeys)


def _normal(names):
  return nn.with_logical_partitioning(nn.initializers.normal(INITIALIZER_RANGE), names)


class BertLayer(nn.Module):
  """One post-LN block: float [B, L, H] -> [B, L, H]; `mask` bool [B, 1, 1, L] (True = attend); `rows` the
  block's dropout RowKeys (None: off)."""

  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, rows=None):
    hidden = x.shape[-1]
    attn = transformer.SelfAttention(
        self.num_heads, dropout_rate=self.dropout_rate, dtype=self.dtype,
        kernel_init=_normal(("embed", "heads", "kv")), bias_init=transformer.zeros_init(("heads", "kv")),
        out_kernel_init=_normal(("heads", "kv", "embed")), out_bias_init=transformer.zeros_init(("embed",)),
        name="attention")(x, mask, dropout_lib.fold(rows, transformer.ATTENTION_PROBS))
    attn = dropout_lib.row_dropout(attn, self.dropout_rate, dropout_lib.fold(rows, transformer.ATTENTION_OUT))
    x = transformer.layer_norm(self.dtype, "attention_ln", self.layer_norm_eps)(x + attn)
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, kernel_init=_normal(("embed", "mlp")),
                 bias_init=transformer.zeros_init(("mlp",)), name="intermediate")(x)  # [B, L, I]
    h = transformer.recomputed(functools.partial(nn.gelu, approximate=False))(h)
    h = nn.Dense(hidden, dtype=self.dtype, kernel_init=_normal(("mlp", "embed")),
                 bias_init=transformer.zeros_init(("embed",)), name="output")(h)  # [B, L, H]
    h = dropout_lib.row_dropout(h, self.dropout_rate, dropout_lib.fold(rows, transformer.MLP_OUT))
    return transformer.layer_norm(self.dtype, "output_ln", self.layer_norm_eps)(x + h)


class BertEncoder(nn.Module):
  """int32 tokens [B, L] (0 = padding) -> float hidden states [B, L, hidden_size] (the model's `dtype`).

  Fields mirror the Hugging Face `config.json` (`models.pretrained.bert_kwargs` reads them from there); `remat`
  and `scan_layers` choose the layer stack (`models.layers`: unrolled `layer_{i}` or scanned `layers`).
  Dropout (embeddings, attention probabilities, block outputs, all at `dropout_rate`) is active only when
  `rows` (the tower's `dropout.RowKeys`) is given.
  """

  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.0
  remat: str = "none"
  scan_layers: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, rows=None):
    if tokens.ndim != 2:
      raise ValueError(f"BertEncoder takes int tokens [batch, length], got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f"text has {length} tokens but the model has only {self.max_position_embeddings} "
                       "positions; lower the maximum text length")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    valid = tokens != 0  # [B, L]

    word = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, embedding_init=_normal(("vocab", "embed")),
                    name="word_embeddings")(tokens)  # [B, L, H]
    position = self.param("position_embeddings", _normal((None, "embed")),
                          (self.max_position_embeddings, self.hidden_size))  # [P, H]
    token_type = self.param("token_type_embeddings", _normal((None, "embed")),
                            (self.type_vocab_size, self.hidden_size))  # [T, H]
    x = word + (position[:length] + token_type[0]).astype(self.dtype)[None]
    x = transformer.layer_norm(self.dtype, "embeddings_ln", self.layer_norm_eps)(x)
    x = dropout_lib.row_dropout(x, self.dropout_rate, dropout_lib.fold(rows, _EMBEDDINGS))

    mask = valid[:, None, None, :]  # [B, 1, 1, L]: keys only, like Hugging Face's extended attention mask
    fields = {"num_heads": self.num_heads, "intermediate_size": self.intermediate_size,
              "layer_norm_eps": self.layer_norm_eps, "dropout_rate": self.dropout_rate, "dtype": self.dtype}
    return layers.apply_stack(BertLayer, fields, x, mask, dropout_lib.fold(rows, _LAYERS), depth=self.num_layers,
                              stack="layers", remat=self.remat, scan=self.scan_layers)
