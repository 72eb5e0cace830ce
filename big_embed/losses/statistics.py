"""The statistics the similarity engine accumulates: what a row of `S` is reduced to, tile by tile.

A `Stat` is an (init, update, final, merge) quadruple over per-row states: `update` folds one [R, T] `Tile` into
the [R] state (online, e.g. a running max with rescaled sums), `final` turns the state into the row's value,
`merge` combines states that cover different shards' rows of the same columns (the column statistics of
`engine.reduce_both` under `key_mode="gather"`). The table of statistics is in `big_embed.losses.engine`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.losses.spmd import Shards, global_mean


class Tile(NamedTuple):
  """One [R, T] block as the statistics see it: reduced over its columns (axis 1, a state per row) or, for the
  reverse direction of a symmetric loss, over its rows (axis 0, a state per column; `symmetric.reduce_both`)."""

  s: jax.Array                                # [R, T] logits scale·q·k + bias
  dot: jax.Array                              # [R, T] raw q·k
  a: jax.Array | None                         # [R, T] target logits or None
  pos: jax.Array                              # [R, T] bool
  neg: jax.Array                              # [R, T] bool
  aux: dict                                   # per-row arrays [R]
  pos_weight: jax.Array | None = None         # [R, T] float with `Rows.pos_weights`: the matched ids' weights
                                              #   (summed), 1 for designated / extra positives, 0 elsewhere
  axis: int = 1                               # the axis a statistic reduces: 1 (rows' states) or 0 (columns')

  def across(self, state_values):
    """Per-state values [R] (axis 1) or [T] (axis 0) broadcast against the tile."""
    return state_values[:, None] if self.axis == 1 else state_values[None, :]

  @property
  def pool(self):
    return self.pos | self.neg

  def mask(self, name: str) -> jax.Array:
    return {"pos": self.pos, "neg": self.neg, "pool": self.pool}[name]




class Stat(NamedTuple):
  init: Callable[[jax.Array], Any]            # zeros [R] -> state
  update: Callable[[Any, Tile], Any]          # state, tile -> state
  final: Callable[[Any], Any]                 # state -> [R] array(s)
  merge: Callable[[Any, Shards], Any]         # states [N_g] partial over each shard's rows -> the whole
                                              #   state of this shard's N_g / P columns (`engine.reduce_both`)


def _values(tile: Tile, fn):
  return tile.s if fn is None else fn(tile)


def finite_shift(m):
  """A finite shift for a running max that may be -inf (empty so far)."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def log_sum(m, l):
  """`m + log l` where l > 0 (l: a sum of exp(x − m)), else -inf (nothing summed)."""
  some = l > 0
  return jnp.where(some, finite_shift(m) + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)


def _check_mask(mask):
  if mask not in ("pos", "neg", "pool"):
    raise ValueError(f"engine: mask must be 'pos', 'neg' or 'pool', got {mask!r}")


def lse(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`log Σ_{j∈mask} exp(x_ij)` with x = fn(tile) (default the logits); -inf for an empty row.

  Online: keeps a running max m (no gradient: the result does not depend on it) and `l = Σ exp(x − m)`,
  rescaled by `exp(m_old − m_new)` when the max grows.
  """
  _check_mask(mask)

  def init(z):
    return z - jnp.inf, z

  def update(state, tile):
    m, l = state
    x = jnp.where(tile.mask(mask), _values(tile, fn), -jnp.inf)  # [R, T]
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(x, axis=tile.axis)))
    shift = finite_shift(m_new)
    l = l * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - tile.across(shift)), axis=tile.axis)
    return m_new, l

  def final(state):
    return log_sum(*state)

  def merge(state, shards):
    m, l = state
    top = shards.pmax(m)  # no gradient: m is a stop-gradient max
    return shards.own(top), shards.psum_scatter(l * jnp.exp(m - finite_shift(top)))

  return Stat(init, update, final, merge)


def soft(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """Statistics under the soft target `q_i = softmax_{j∈mask}(a_ij)`, with a = fn(tile) (default tile.a).

  Returns a dict of [R] arrays: "lse" = `log Σ_j exp(a_ij)` (-inf if empty), "s" = `E_q[s]`, "a" = `E_q[a]`
  (0 if empty). The targets `a` are wrapped in `stop_gradient`; `E_q[s]` is differentiable in s.
  """
  _check_mask(mask)

  def init(z):
    return z - jnp.inf, z, z, z

  def update(state, tile):
    m, l, es, ea = state
    msk = tile.mask(mask)
    a = lax.stop_gradient(tile.a if fn is None else fn(tile))
    am = jnp.where(msk, a, -jnp.inf)  # [R, T]
    m_new = jnp.maximum(m, jnp.max(am, axis=tile.axis))
    shift = finite_shift(m_new)
    c = jnp.exp(m - shift)
    w = jnp.exp(am - tile.across(shift))  # [R, T], 0 where masked
    l = l * c + jnp.sum(w, axis=tile.axis)
    es = es * c + jnp.sum(w * jnp.where(msk, tile.s, 0.0), axis=tile.axis)
    ea = ea * c + jnp.sum(w * jnp.where(msk, a, 0.0), axis=tile.axis)
    return m_new, l, es, ea

  def final(state):
    m, l, es, ea = state
    some = l > 0
    safe_l = jnp.where(some, l, 1.0)
    return {"lse": jnp.where(some, finite_shift(m) + jnp.log(safe_l), -jnp.inf), "s": es / safe_l, "a": ea / safe_l}

  def merge(state, shards):
    m, *sums = state
    top = shards.pmax(m)  # the targets' max: no gradient
    c = jnp.exp(m - finite_shift(top))
    return (shards.own(top), *(shards.psum_scatter(x * c) for x in sums))

  return Stat(init, update, final, merge)


def _sum_merge(acc, shards):
  return shards.psum_scatter(acc)


def total(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`Σ_{j∈mask} x_ij`, x = fn(tile) (default the logits). fn must be finite on masked entries."""
  _check_mask(mask)
  return Stat(lambda z: z,
              lambda acc, tile: acc + jnp.sum(jnp.where(tile.mask(mask), _values(tile, fn), 0.0), axis=tile.axis),
              lambda acc: acc, _sum_merge)


def count(mask: str = "pool") -> Stat:
  """`|mask_i|` as float32."""
  _check_mask(mask)
  return Stat(lambda z: z, lambda acc, tile: acc + jnp.sum(tile.mask(mask), axis=tile.axis, dtype=jnp.float32),
              lambda acc: acc, _sum_merge)


def maximum(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`max_{j∈mask} x_ij` (-inf if empty). For metrics and brackets: gradients are not meant to flow."""
  _check_mask(mask)
  return Stat(lambda z: z - jnp.inf,
              lambda m, tile: jnp.maximum(
                  m, jnp.max(jnp.where(tile.mask(mask), lax.stop_gradient(_values(tile, fn)), -jnp.inf), tile.axis)),
              lambda m: m, lambda m, shards: shards.own(shards.pmax(m)))


def minimum(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`min_{j∈mask} x_ij` (+inf if empty), no gradient."""
  _check_mask(mask)
  return Stat(lambda z: z + jnp.inf,
              lambda m, tile: jnp.minimum(
                  m, jnp.min(jnp.where(tile.mask(mask), lax.stop_gradient(_values(tile, fn)), jnp.inf), tile.axis)),
              lambda m: m, lambda m, shards: shards.own(shards.pmin(m)))


def top1_stats() -> dict[str, Stat]:
  """The statistics `top1_accuracy` reads: each row's best positive and best negative score."""
  return {"pos_max": maximum("pos"), "neg_max": maximum("neg")}


def top1_accuracy(st: dict, ok: jax.Array, shards: Shards) -> jax.Array:
  """Share of the rows `ok` [R] whose best positive scores at least as high as every negative (the top-1 column is
  a positive; a row without negatives counts as correct), from `top1_stats`; a global mean over the shards."""
  correct = ok & (st["pos_max"] >= st["neg_max"])
  return global_mean(correct.astype(jnp.float32), ok, shards)
