"""Image resizing shared by training and evaluation, so both see identically processed pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_rgb(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (PIL bilinear) and converts to RGB.

  Args:
    image: uint8 [H, W] or [H, W, 1] (grayscale) or [H, W, 3] or [H, W, 4] (the alpha channel is dropped).
    size: output side length S.

  Returns:
    uint8 [S, S, 3].
  """
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]  # [H, W]
  if image.ndim == 3 and image.shape[-1] == 4:
    image = image[..., :3]
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)  # [S, S, 3]
  return np.ascontiguousarray(image, dtype=np.uint8)


def batch_to_rgb(images: np.ndarray | Sequence[np.ndarray], size: int) -> np.ndarray:
  """`to_rgb` over a batch: uint8 [N, H, W(, C)], or N images of any sizes -> uint8 [N, S, S, 3]."""
  out = np.empty((len(images), size, size, 3), np.uint8)  # [N, S, S, 3]
  for i, image in enumerate(images):
    out[i] = to_rgb(image, size)
  return out
