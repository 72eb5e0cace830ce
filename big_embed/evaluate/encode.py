"""Batched, sharded encoding of images and texts with a two-tower model."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import auto as tqdm

from big_embed.errors import TrainingError
from big_embed.parallel import mesh as mesh_lib


class NonFiniteEmbeddings(TrainingError):
  """Embeddings with NaN or inf values: every metric of them is meaningless (NaN scores compare false, so NaN
  embeddings would otherwise score 100 % recall)."""


def check_finite(emb: np.ndarray, what: str) -> np.ndarray:
  """`emb` [N, D] unchanged if every value is finite.

  Raises:
    NonFiniteEmbeddings: naming `what` ("images", "texts") and how many of the N rows hold NaN or inf.
  """
  bad = int(np.count_nonzero(~np.isfinite(emb).all(axis=tuple(range(1, emb.ndim)))))
  if bad:
    raise NonFiniteEmbeddings(f"{bad} of {len(emb)} {what} embed to non-finite values (NaN or inf): the parameters "
                              "evaluated give no usable embeddings (a diverged run; see train/loss in metrics.jsonl)")
  return emb


class Encoder:
  """Embeds NumPy inputs in fixed-size global batches sharded over the mesh's batch axes; every embedding that
  evaluation uses comes from here, so non-finite ones are rejected here, once (`check_finite`, on the host copy
  the outputs are gathered into anyway)."""

  def __init__(self, model, mesh, batch_size: int, text_method: str = "encode_text"):
    """`text_method`: the model's method that embeds tokens ("features": a text model's embeddings before
    normalisation)."""
    shards = mesh_lib.batch_size_per_shard(mesh)
    self.batch_size = max(shards, (batch_size // shards) * shards)
    self.mesh = mesh
    out = mesh_lib.batch_sharding(mesh, 2)
    self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image"), out_shardings=out)
    self._text = jax.jit(lambda p, x: model.apply({"params": p}, x, method=text_method), out_shardings=out)

  def _run(self, fn, params, inputs: np.ndarray, desc: str | None, what: str) -> np.ndarray:
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
    return check_finite(np.concatenate(outs)[:n], what)

  def images(self, params, images: np.ndarray, desc: str | None = None) -> np.ndarray:
    """float32 [N, D] embeddings of `images` [N, H, W, 3]; NonFiniteEmbeddings if any is NaN or inf."""
    return self._run(self._image, params, images, desc, "images")

  def texts(self, params, tokens: np.ndarray, desc: str | None = None) -> np.ndarray:
    """float32 [N, D] embeddings of `tokens` [N, L]; NonFiniteEmbeddings if any is NaN or inf."""
    return self._run(self._text, params, tokens, desc, "texts")


class TextEncoding:
  """`(params, texts, role, desc=None) -> float32 [N, D]`: prefix, tokenize, embed in length buckets.

  `role` is "query" or "doc" and picks the prefix (e.g. "query: "). Texts are sorted by token count and each batch
  is cut to its longest row, rounded up to a multiple of `bucket` tokens, so short texts (single words) do not pay
  for the longest document's length; the outputs come back in input order.
  """

  def __init__(self, encoder: Encoder, tokenizer, max_len: int, query_prefix: str = "", doc_prefix: str = "",
               bucket: int = 16):
    self.encoder, self.tokenizer, self.max_len, self.bucket = encoder, tokenizer, max_len, bucket
    self.prefixes = {"query": query_prefix, "doc": doc_prefix}

  def __call__(self, params, texts, role: str = "doc", desc: str | None = None) -> np.ndarray:
    if role not in self.prefixes:
      raise ValueError(f"role must be 'query' or 'doc', got {role!r}")
    prefix = self.prefixes[role]
    tokens = self.tokenizer.encode_batch([prefix + t for t in texts], self.max_len)  # [N, L]
    if not len(tokens):
      raise ValueError("no texts to encode")
    lengths = (tokens != 0).sum(axis=1)
    order = np.argsort(-lengths, kind="stable")  # longest first: the first compile is the largest shape
    b = self.encoder.batch_size
    out = None
    starts = range(0, len(order), b)
    if desc and jax.process_index() == 0:
      starts = tqdm.tqdm(starts, desc=desc, leave=False)
    for start in starts:
      rows = order[start:start + b]
      width = int(min(self.max_len, max(self.bucket, -(-int(lengths[rows].max()) // self.bucket) * self.bucket)))
      emb = self.encoder.texts(params, tokens[rows, :width])
      if out is None:
        out = np.zeros((len(tokens), emb.shape[1]), np.float32)
      out[rows] = emb
    return out
