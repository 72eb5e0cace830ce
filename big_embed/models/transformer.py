"""Pre-LayerNorm Transformer encoder blocks shared by the image and text towers, and the self-attention every
tower uses (BERT's too).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`) so that `parallel.sharding` can map them
onto the mesh (FSDP over `embed`, tensor parallelism over `mlp`/`heads`). Dropout is row-keyed (`models.dropout`):
a block takes the tower's `RowKeys` (None: no dropout) and gives each of its dropout sites its own fold.
Computation runs in the tower's `dtype` with float32 params; LayerNorm statistics and the attention softmax are
float32 whatever the dtype. The cheap elementwise parts (GELU, LayerNorm, the attention softmax) are recomputed in
the backward pass from their inputs (`recomputed`) instead of keeping their intermediates: on the W1 step (CPU) that
is 0.64 GiB fewer temporaries (2.16 -> 1.51 GiB) and no slower (the kept tensors cost more memory traffic than the
recomputation; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_embed.models import dropout as dropout_lib
from big_embed.models import layers

Dtype = jnp.dtype
Initializer = Callable

# Dropout sites of a block (folded into its RowKeys).
ATTENTION_PROBS, ATTENTION_OUT, MLP_OUT = 0, 1, 2


def dense_init(names):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros, names)


class SelfAttention(nn.Module):
  """Multi-head self-attention: float [B, T, D] -> [B, T, D]; `mask` bool broadcastable to [B, heads, T, T]
  (True = attend); `rows` the RowKeys of its probability dropout (None: off).

  The params and numbers of Flax's `nn.MultiHeadDotProductAttention` (DenseGeneral `query`, `key`, `value`
  kernels [D, heads, D / heads], `out` [heads, D / heads, D], with biases; softmax(q·k / sqrt(d)) · v), so
  checkpoints written with it and the Hugging Face BERT mapping load unchanged. Differences: dropout on the
  probabilities is row-keyed and drawn per row and head (Flax broadcasts one mask over batch and heads), and the
  softmax is float32 in a bfloat16 model.
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = dense_init(("embed", "heads", "kv"))
  bias_init: Initializer = zeros_init(("heads", "kv"))
  out_kernel_init: Initializer = dense_init(("heads", "kv", "embed"))
  out_bias_init: Initializer = zeros_init(("embed",))

  @nn.compact
  def __call__(self, x, mask=None, rows=None):
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"model width {d} is not divisible by num_heads={self.num_heads}")
    dense = functools.partial(nn.DenseGeneral, features=(self.num_heads, d // self.num_heads), axis=-1,
                              dtype=self.dtype, kernel_init=self.kernel_init, bias_init=self.bias_init)
    q, k, v = dense(name="query")(x), dense(name="key")(x), dense(name="value")(x)  # [B, T, heads, D / heads]
    weights = recomputed(functools.partial(nn.dot_product_attention_weights, dtype=self.dtype,
                                           force_fp32_for_softmax=True))(q, k, mask=mask)  # [B, heads, T, T]
    weights = dropout_lib.row_dropout(weights, self.dropout_rate, rows).astype(self.dtype)
    context = jnp.einsum("...hqk,...khd->...qhd", weights, v)  # [B, T, heads, D / heads]
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=self.out_kernel_init,
                           bias_init=self.out_bias_init, name="out")(context)


def recomputed(fn: Callable) -> Callable:
  """`fn` whose backward recomputes it from its inputs instead of keeping its intermediates (`jax.checkpoint`, with
  its CSE barrier: outside a scan XLA would otherwise merge the recomputation back into the forward)."""
  return jax.checkpoint(fn)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D]
    d = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init(("embed", "mlp")),
                 bias_init=zeros_init(("mlp",)), name="fc1")(x)
    h = recomputed(nn.gelu)(h)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init(("mlp", "embed")),
                    bias_init=zeros_init(("embed",)), name="fc2")(h)


def layer_norm(dtype: Dtype, name: str, epsilon: float = 1e-6) -> nn.LayerNorm:
  """LayerNorm over the last axis (statistics in float32, output in `dtype`), params named for sharding."""
  return nn.remat(nn.LayerNorm)(epsilon=epsilon, dtype=dtype, name=name,  # recomputed in the backward
                                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                                bias_init=zeros_init(("embed",)))


class EncoderBlock(nn.Module):
  """x + Dropout(Attn(LN(x))); x + Dropout(MLP(LN(x))): [B, T, D] -> [B, T, D]; mask [B, 1, T, T] or None."""

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, rows=None):
    y = layer_norm(self.dtype, "ln_attn")(x)
    y = SelfAttention(self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                      name="attn")(y, mask, dropout_lib.fold(rows, ATTENTION_PROBS))
    x = x + dropout_lib.row_dropout(y, self.dropout_rate, dropout_lib.fold(rows, ATTENTION_OUT))
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(layer_norm(self.dtype, "ln_mlp")(x))
    return x + dropout_lib.row_dropout(y, self.dropout_rate, dropout_lib.fold(rows, MLP_OUT))


class Encoder(nn.Module):
  """`depth` EncoderBlocks (`models.layers`: unrolled `block{i}` or scanned `blocks`), then a LayerNorm."""

  depth: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  attention_dropout_rate: float
  remat: str
  scan_layers: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, rows=None):
    fields = {"num_heads": self.num_heads, "mlp_dim": self.mlp_dim, "dropout_rate": self.dropout_rate,
              "attention_dropout_rate": self.attention_dropout_rate, "dtype": self.dtype}
    x = layers.apply_stack(EncoderBlock, fields, x, mask, rows, depth=self.depth, stack="blocks",
                           remat=self.remat, scan=self.scan_layers)
    return layer_norm(self.dtype, "ln_final")(x)


class Tower(nn.Module):
  """The fields every pre-LN Transformer tower shares; `encode` runs its blocks and the final LayerNorm."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  # Keyword-only: compute dtype (params stay float32), dropout rates, the layer stack (`models.layers`).
  dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
  dropout: float = dataclasses.field(default=0.0, kw_only=True)  # residual branches (attention and MLP outputs)
  attention_dropout: float = dataclasses.field(default=0.0, kw_only=True)  # attention probabilities
  remat: str = dataclasses.field(default="none", kw_only=True)
  scan_layers: bool = dataclasses.field(default=False, kw_only=True)

  def encode(self, x, mask=None, rows=None):  # [B, T, width] -> [B, T, width]
    """Call from the tower's compact `__call__`; params under "encoder" (blocks `block{i}` or scanned `blocks`,
    then `ln_final`)."""
    return Encoder(self.depth, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, self.remat,
                   self.scan_layers, dtype=self.dtype, name="encoder")(x, mask, rows)
