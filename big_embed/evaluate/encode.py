"""Batched, sharded encoding of images and texts with a two-tower model."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import auto as tqdm

from big_embed.parallel import mesh as mesh_lib


class Encoder:
  """Embeds NumPy inputs in fixed-size global batches sharded over the mesh's batch axes."""

  def __init__(self, model, mesh, batch_size: int):
    shards = mesh_lib.batch_size_per_shard(mesh)
    self.batch_size = max(shards, (batch_size // shards) * shards)
    self.mesh = mesh
    out = mesh_lib.batch_sharding(mesh, 2)
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"), out_shardings=out)
    self._text = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"), out_shardings=out)

  def _run(self, fn, params, inputs: np.ndarray, desc: str | None) -> np.ndarray:
    n = len(inputs)
    b = self.batch_size
    p_count, p_index = jax.process_count(), jax.process_index()
    sharding = mesh_lib.batch_sharding(self.mesh, inputs.ndim)
    outs = []
    starts = range(0, n, b)
    if desc:
      starts = tqdm.tqdm(starts, desc=desc, leave=False, disable=p_index != 0)
    for start in starts:
      chunk = inputs[start:start + b]
      if len(chunk) < b:  # pad the last batch; padded rows are dropped below
        pad = np.zeros((b - len(chunk),) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      local = chunk.reshape(p_count, b // p_count, *chunk.shape[1:])[p_index]
      x = jax.make_array_from_process_local_data(sharding, local)
      y = fn(params, x)
      outs.append(multihost_utils.process_allgather(y, tiled=True) if p_count > 1 else np.asarray(y))
    return np.concatenate(outs)[:n]

  def images(self, params, images: np.ndarray, desc: str | None = None) -> np.ndarray:
    return self._run(self._image, params, images, desc)

  def texts(self, params, tokens: np.ndarray, desc: str | None = None) -> np.ndarray:
    return self._run(self._text, params, tokens, desc)
