"""Exact gradient caching (GradCache, Gao et al. 2021): a global batch bounded by memory, not by activations.

A contrastive loss couples every row of the global batch with every other, so plain gradient accumulation (a few
small batches, one update) changes the loss: each micro-batch sees only its own negatives. Gradient caching keeps
the loss exact and bounds the towers' activation memory by one chunk instead:

  1. embed: the model inputs of the global batch are cut into chunks of `size` rows per device and embedded one
     chunk at a time in a `lax.scan`, without gradient (no activations are kept);
  2. loss: `loss_fn(emb, batch, loss params, step)` over the whole global batch (every device's rows against
     every device's columns, as without caching), differentiated w.r.t. the embeddings and the loss params;
  3. replay: a second scan re-runs each chunk's forward under `jax.vjp` with the same dropout key and the rows'
     global indices (`row_ids`: the towers key dropout masks by row, so every mask equals the plain step's) and
     pulls d loss / d emb of the chunk back into parameter gradients, summed over the chunks.

The result equals `step.make_loss_and_grads` up to float32 summation order, for any loss (wrappers, hard
negatives, label texts, teacher embeddings in the batch), because nothing here knows the loss: it only needs the
towers to embed each row independently of the others (no batch statistics). Cost: one extra forward pass.

Layout: the global batch is sharded over the mesh's batch axes, P shards of B_l rows. A leaf [B, ...] is viewed
as [P, B_l, ...], padded to [P, n·C, ...] (n = ceil(B_l / C) chunks of C rows; padded rows are all zeros and
their embeddings are dropped, so their gradient is zero), and reordered to [n, P·C, ...]: chunk c holds rows
c·C .. c·C+C-1 of every shard and stays sharded over the same axes, so no data moves between devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_embed.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class Chunking:
  """`size` rows per device per chunk (config.train.embed_chunk_size) over the batch shards of `mesh`; `inputs`
  are the batch entries the model embeds (its kind's `outputs`: a model returns one embedding per input)."""

  mesh: Mesh
  size: int
  inputs: tuple[str, ...]

  @property
  def shards(self) -> int:
    return mesh_lib.batch_size_per_shard(self.mesh)

  def layout(self, rows: int) -> tuple[int, int]:
    """(chunks per device n, rows per chunk and device C) for a global batch of `rows`."""
    local = rows // self.shards
    size = min(self.size, local)
    return -(-local // size), size

  def _constrain(self, x, batch_axis: int):
    spec = [None] * x.ndim
    spec[batch_axis] = mesh_lib.BATCH_AXES
    return lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

  def split(self, x: jax.Array, rows: int) -> jax.Array:
    """[B, ...] -> [n, P·C, ...] (chunk-major; see the module docstring)."""
    n, size = self.layout(rows)
    p = self.shards
    x = x.reshape((p, rows // p) + x.shape[1:])
    x = jnp.pad(x, [(0, 0), (0, n * size - rows // p)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((p, n, size) + x.shape[2:]).swapaxes(0, 1).reshape((n, p * size) + x.shape[2:])
    return self._constrain(x, 1)

  def merge(self, x: jax.Array, rows: int) -> jax.Array:
    """[n, P·C, ...] -> [B, ...], dropping the padded rows (the inverse of `split`)."""
    n, size = self.layout(rows)
    p = self.shards
    x = x.reshape((n, p, size) + x.shape[2:]).swapaxes(0, 1).reshape((p, n * size) + x.shape[2:])
    x = x[:, :rows // p].reshape((rows,) + x.shape[2:])
    return self._constrain(x, 0)

  def chunks(self, batch: dict) -> tuple[dict, jax.Array, int]:
    """(the model inputs of `batch` split into chunks, their global row indices [n, P·C], the global rows B)."""
    inputs = {k: batch[k] for k in self.inputs if k in batch}
    if not inputs:
      raise ValueError(f"gradient caching: the batch has none of the model's inputs {self.inputs}")
    rows = {x.shape[0] for x in inputs.values()}
    if len(rows) != 1:
      raise ValueError(f"gradient caching: the model inputs have different row counts "
                       f"{ {k: x.shape[0] for k, x in inputs.items()} }")
    (b,) = rows
    ids = jnp.arange(b, dtype=jnp.int32)
    return {k: self.split(x, b) for k, x in inputs.items()}, self.split(ids, b), b


def _embed_split(embed: Callable, chunks: dict, ids: jax.Array, rows: int, chunking: Chunking) -> dict:
  """`embed` over split inputs (`Chunking.chunks`), one chunk per scan step, without gradient; merged back."""

  def body(_, chunk):
    x, row_ids = chunk
    return None, lax.stop_gradient(embed(x, row_ids))

  _, emb = lax.scan(body, None, (chunks, ids))  # {name: [n, P·C, ...]}
  return {k: chunking.merge(v, rows) for k, v in emb.items()}


def embed_in_chunks(embed: Callable, batch: dict, chunking: Chunking) -> dict:
  """`embed(inputs, row_ids) -> {name: [rows, ...]}` applied chunk by chunk, without gradient; the outputs
  reassembled into the global batch order."""
  return _embed_split(embed, *chunking.chunks(batch), chunking)


def make_cached_loss_and_grads(model: nn.Module, loss_fn: Callable, chunking: Chunking) -> Callable:
  """`(params, batch, dropout_rng, step) -> ((loss, metrics), grads)`, equal to `step.make_loss_and_grads`'s but
  with the towers' activations held for one chunk at a time (the module docstring)."""

  def loss_and_grads(params, batch, dropout_rng, step):
    def embed(p, x, row_ids):
      return model.apply({"params": p}, x, row_ids=row_ids, rngs={"dropout": dropout_rng})

    chunks, ids, rows = chunking.chunks(batch)  # split once: embedded now, replayed below
    emb = _embed_split(lambda x, row_ids: embed(params["model"], x, row_ids), chunks, ids, rows, chunking)
    (loss, metrics), (emb_grads, loss_grads) = jax.value_and_grad(
        lambda e, lp: loss_fn(e, batch, lp, step), argnums=(0, 1), has_aux=True)(emb, params["loss"])

    emb_grads = {k: chunking.split(g, rows) for k, g in emb_grads.items()}  # [n, P·C, ...]

    def replay(acc, chunk):
      x, row_ids, g = chunk
      _, pull_back = jax.vjp(lambda p: embed(p, x, row_ids), params["model"])
      (grads,) = pull_back(g)
      return jax.tree.map(jnp.add, acc, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params["model"])
    model_grads, _ = lax.scan(replay, zeros, (chunks, ids, emb_grads))
    return (loss, metrics), {"model": model_grads, "loss": loss_grads}

  return loss_and_grads
