"""Vision Transformer image tower (Dosovitskiy et al. 2021), global-average pooled."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from big_embed.models import transformer


class ViT(transformer.Tower):
  """uint8 images [B, H, W, 3] -> pooled features float32 [B, width]; `rows`: its dropout RowKeys (None: off)."""

  image_size: int
  patch_size: int

  @nn.compact
  def __call__(self, images, rows=None):
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"images are {images.shape[1:3]}, the model expects {self.image_size}x{self.image_size}")
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    x = images.astype(self.dtype) / 127.5 - 1.0
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), strides=self.patch_size, padding="VALID",
                dtype=self.dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")),
                bias_init=transformer.zeros_init(("embed",)), name="patch_embed")(x)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)  # [B, T, D]
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
                     (h * w, d))
    x = x + pos.astype(self.dtype)
    x = self.encode(x, rows=rows)
    return jnp.mean(x.astype(jnp.float32), axis=1)  # [B, D]
