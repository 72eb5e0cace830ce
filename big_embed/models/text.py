"""Transformer text tower over token ids (0 = padding), mean-pooled over real tokens."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_embed.models import transformer


class TextTransformer(transformer.Tower):
  """int32 tokens [B, L] -> pooled features float32 [B, width]; `rows`: its dropout RowKeys (None: off)."""

  vocab_size: int
  max_len: int

  @nn.compact
  def __call__(self, tokens, rows=None):
    if tokens.shape[1] > self.max_len:
      raise ValueError(f"text has {tokens.shape[1]} tokens, the model allows at most {self.max_len}")
    valid = tokens != 0  # [B, L]
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                 embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                 name="token_embed")(tokens)
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed")),
                     (self.max_len, self.width))
    x = x + pos[: tokens.shape[1]].astype(self.dtype)
    mask = nn.make_attention_mask(valid, valid)  # [B, 1, L, L]
    x = self.encode(x, mask, rows).astype(jnp.float32)
    w = valid[..., None].astype(jnp.float32)
    return jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # [B, D]
