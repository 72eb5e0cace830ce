"""The batch shards a loss runs over: `Shards` (the mesh's batch axes inside `shard_map`), `shard` (a local function
of the rows under `shard_map`) and `global_mean` (the one normalisation by the global row count).

A loss written for the local rows of one device (`B_local` rows, every device's keys via collectives on
`Shards`) runs unchanged on one device: outside `shard_map` `Shards()` has no axes and every collective is the
identity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from big_embed.parallel.mesh import BATCH_AXES


@dataclasses.dataclass(frozen=True)
class Shards:
  """The batch axes the engine runs over: () outside `shard_map` (one shard), else the mesh's batch axes."""

  axes: tuple[str, ...] = ()
  size: int = 1

  @classmethod
  def of(cls, mesh) -> "Shards":
    if mesh is None:
      return cls()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return cls(axes, math.prod(mesh.shape[a] for a in axes))

  def varying(self, tree):
    """Every leaf marked as varying over the batch axes (as a loop carry that differs per shard must be); the
    transpose of the cast sums a shard-invariant value's gradient over the shards."""

    def cast(x):
      missing = tuple(a for a in self.axes if a not in jax.typeof(x).mat.varying)
      return lax.pcast(x, missing, to="varying") if missing else x  # no copy of what already varies

    return jax.tree.map(cast, tree)

  def index(self):
    return lax.axis_index(self.axes) if self.axes else 0

  def psum(self, x):
    return lax.psum(x, self.axes) if self.axes else x

  def all_gather(self, x):
    return lax.all_gather(x, self.axes, tiled=True) if self.axes else x

  def psum_scatter(self, x):
    """Sums `x` [N_g, ...] over the shards and keeps this shard's N_g / P rows (the all-gather's transpose)."""
    return lax.psum_scatter(x, self.axes, scatter_dimension=0, tiled=True) if self.axes else x

  def pmax(self, x):
    """The max over the shards, without gradient (for shifts, brackets and metrics)."""
    return lax.pmax(lax.stop_gradient(x), self.axes) if self.axes else lax.stop_gradient(x)

  def pmin(self, x):
    """The min over the shards, without gradient."""
    return lax.pmin(lax.stop_gradient(x), self.axes) if self.axes else lax.stop_gradient(x)

  def own(self, x):
    """This shard's N_g / P rows of `x` [N_g, ...] (the all-gather's order)."""
    if not self.axes:
      return x
    n = x.shape[0] // self.size
    return lax.dynamic_slice_in_dim(x, self.index() * n, n)

  def to_next(self, x):
    """Sends this shard's `x` to shard index+1 (a ring step)."""
    if self.size == 1:
      return x
    return lax.ppermute(x, self.axes, [(i, (i + 1) % self.size) for i in range(self.size)])

  def to_prev(self, x):
    """Sends this shard's `x` to shard index−1 (a ring step backward)."""
    if self.size == 1:
      return x
    return lax.ppermute(x, self.axes, [(i, (i - 1) % self.size) for i in range(self.size)])


def shard(local_fn: Callable, mesh, sharded: dict, replicated: dict):
  """Runs `local_fn(sharded_local, replicated, shards)` under `shard_map`; outputs must be replicated scalars.

  Args:
    local_fn: function of (dict of local shards, dict of replicated values, `Shards`) -> pytree of scalars
      that are already reduced over the shards (psum).
    mesh: the device mesh, or None to call `local_fn` directly on the global arrays (one shard).
    sharded: dict of arrays whose leading (batch) dim is split over the mesh's batch axes.
    replicated: dict of arrays every shard sees whole (loss params, step, ...).
  """
  shards = Shards.of(mesh)
  for name, x in sharded.items():
    if x.ndim == 0 or x.shape[0] % shards.size:
      raise ValueError(f"{name}: leading dim {x.shape[:1]} must be divisible by the {shards.size} batch shards "
                       f"of the mesh {dict(mesh.shape) if mesh is not None else {}}")
  if mesh is None:
    return local_fn(sharded, replicated, shards)
  fn = jax.shard_map(
      lambda s, r: local_fn(s, r, shards), mesh=mesh,
      in_specs=({k: P(shards.axes) for k in sharded}, {k: P() for k in replicated}), out_specs=P())
  return fn(sharded, replicated)


def global_mean(values: jax.Array, weights: jax.Array, shards: Shards) -> jax.Array:
  """`psum(Σ w·v) / psum(Σ w)`: the one normalisation by the global row count; 0 when no row counts.

  values, weights: [R]. Rows with weight 0 are dropped with a `where` (their values may be ±inf).
  """
  weights = weights.astype(jnp.float32)
  num = shards.psum(jnp.sum(jnp.where(weights > 0, values, 0.0) * weights))
  den = shards.psum(jnp.sum(weights))
  return num / jnp.maximum(den, 1.0)
