"""Pre-LayerNorm Transformer encoder blocks shared by the image and text towers.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`) so that `parallel.sharding` can map them
onto the mesh (FSDP over `embed`, tensor parallelism over `mlp`/`heads`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

Dtype = jnp.dtype


def dense_init(names):
  return nn.with_logical_partitioning(nn.initializers.xavier_uniform(), names)


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros, names)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, T, D]
    d = x.shape[-1]
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init(("embed", "mlp")),
                 bias_init=zeros_init(("mlp",)), name="fc1")(x)
    h = nn.gelu(h)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init(("mlp", "embed")),
                    bias_init=zeros_init(("embed",)), name="fc2")(h)


class EncoderBlock(nn.Module):
  """x + MHA(LN(x)); x + MLP(LN(x))."""

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):  # x: [B, T, D]; mask: [B, 1, T, T] or None
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"model width {d} is not divisible by num_heads={self.num_heads}")
    ln = lambda name: nn.LayerNorm(dtype=self.dtype, name=name,
                                   scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                                   bias_init=zeros_init(("embed",)))
    y = ln("ln_attn")(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
        bias_init=zeros_init(("heads", "kv")),
        out_kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        out_bias_init=zeros_init(("embed",)),
        deterministic=True, name="attn")(y, y, mask=mask)
    x = x + y
    y = ln("ln_mlp")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block{i}")(x, mask)
    return nn.LayerNorm(dtype=self.dtype, name="ln_final",
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=zeros_init(("embed",)))(x)


class Tower(nn.Module):
  """The sizes every Transformer tower shares; `encode` runs its `Encoder` (submodule "encoder")."""

  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)  # compute dtype (params stay float32)

  def encode(self, x, mask=None):  # [B, T, width] -> [B, T, width]
    return Encoder(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, name="encoder")(x, mask)
