"""Both directions of a symmetric loss from one pass over the tiles of `S = scale · A Bᵀ + bias`.

A symmetric loss (CLIP, SoftCLIP, LightCLIP) needs row statistics of `S` (A's rows against B's columns) and of
`Sᵀ` (B's rows against A's). They come from the same tiles: each [R, T] tile of the local rows against T keys is
reduced along its rows (the running, online states of `engine.reduce_rows`) and along its columns (complete within
the tile, since every local row is in it), so a forward pass computes each tile once, not once per direction.

* `reduce_both`: any `engine` statistics, gradients by autodiff through the rematerialised tile scan (as
  `reduce_rows`): per tile 1 matmul forward, 3 backward (the recomputed tile, dQ, dK) instead of 2 × 4.
* `lse_both`: the one reduction InfoNCE needs per direction (the LSE over each row's and each column's
  negatives, with their max and count), with a hand-written backward (the FlashAttention / Inf-CL scheme): the
  backward recomputes a tile from the saved per-row and per-column LSEs, forms `dS = g_r·softmax_row +
  g_c·softmax_col` on the negatives and accumulates `dQ = scale·dS K`, `dK = scale·dSᵀ Q`. Four matmuls per tile in
  all and two exponentials per entry forward and backward: CLIP at N = 16,384 in a fraction of the autodiff
  version's elementwise work (benchmarks/RESULTS.md).

Under `key_mode="gather"` with several shards, each shard reduces its rows for all N_g gathered columns, and the
partial column states are combined over the shards (a max and a reduce-scatter, O(N_g) floats per statistic),
leaving each shard the statistics of its own keys. The ring over several shards has no one-pass form here (the
column states would have to travel with the key blocks): callers check `one_pass` and run `reduce_rows` per
direction there.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax

from big_embed.losses import engine
from big_embed.losses import statistics


def one_pass(key_mode: str, shards: engine.Shards) -> bool:
  """Whether `reduce_both` can serve this key mode: every mode but the ring over several shards."""
  return key_mode != "ring" or shards.size == 1


def _scan_both(stats, col_stats, state, rows: engine.Rows, keys: engine.Keys, col_targets, coef: engine.Coef,
               tile_size: int):
  """(row states, column states): each tile of `keys` computed once, folded into the rows' online states and
  reduced over this shard's rows for its columns (complete per tile: every local row is in it). Column states
  come back as scan outputs, [N] per leaf; the tile body is rematerialised in the backward pass."""
  n = keys.k.shape[0]
  row_t, key_t = (None, None) if col_targets is None else col_targets

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(rows, coef, row_t, state, kt, kt_t):
    tile = engine.key_tile(rows, kt, coef)
    col_tile = tile._replace(axis=0, aux={})  # the same tile, reduced over its rows
    if row_t is not None:  # the reverse direction's own targets
      col_tile = col_tile._replace(a=coef.target_scale * jnp.dot(row_t, kt_t.T, precision=lax.Precision.HIGHEST))
    zeros = jnp.zeros_like(col_tile.s[0])  # [T]
    cols = {name: st.update(st.init(zeros), col_tile) for name, st in col_stats.items()}
    return engine.update_all(stats, state, tile), cols

  kt, kt_t = engine.tile_keys(keys, tile_size, key_t)
  state, cols = lax.scan(lambda c, x: body(rows, coef, row_t, c, *x), state, (kt, kt_t))
  return state, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[:n], cols)


def reduce_both(stats: dict[str, engine.Stat], rows: engine.Rows, keys: engine.Keys, *,
                col_stats: dict[str, engine.Stat] | None = None,
                col_targets: tuple[jax.Array, jax.Array] | None = None, scale=1.0, bias=0.0, target_scale=1.0,
                tile_size: int = 1024, key_mode: str = "gather", shards: engine.Shards = engine.Shards()):
  """Row statistics of `S` and of `Sᵀ` in one pass, for a symmetric loss (CLIP, SoftCLIP, LightCLIP).

  The reverse direction's rows are the keys and its keys are the rows, with the transposed masks (so every
  row↔key relation must be symmetric: designated positives by index, ids, `key_mask` of the reverse direction =
  its transpose, the same validity); each `S` tile is computed once and reduced along both axes. Under
  `key_mode="gather"` each shard reduces its rows for all N_g columns, and the statistics' `merge` combines the
  shards' partial states (a max and a reduce-scatter: O(N_g) floats per statistic), leaving each shard the
  statistics of its own keys. Gradients as `reduce_rows` (autodiff through the rematerialised tile scan).

  Args:
    stats: the row statistics (see `reduce_rows`); col_stats: the keys' statistics (default: the same).
    rows, keys: as `reduce_rows` (no `neg_threshold`, no `aux`: they have no transpose; no extra columns).
    col_targets: the reverse direction's target features (row side [R, da2], key side [N_local, da2]): its target
      logits at (key j, row i) are `target_scale · kt_j · rt_i` (no gradient); default: the transposed row targets.
    scale, bias, target_scale, tile_size, shards: as `reduce_rows`. key_mode: "gather" | "local" (or "ring"
      with one shard; `one_pass` says whether a mode is served).

  Returns:
    (row results: name -> [R] arrays, key results: name -> [N_local] arrays).
  """
  col_stats = stats if col_stats is None else col_stats
  if not one_pass(key_mode, shards):
    raise ValueError("symmetric: reduce_both has no ring over several shards; call reduce_rows per direction")
  if rows.neg_threshold is not None or rows.aux:
    raise ValueError("symmetric: reduce_both takes no neg_threshold or aux (the reverse direction has no transpose)")
  rows, coef, state = engine.prepare(stats, rows, keys, None, scale, bias, target_scale, tile_size, key_mode)
  keys = engine.frozen_targets(keys)
  if col_targets is not None:
    row_t, key_t = map(lax.stop_gradient, col_targets)
    engine.check_shape(row_t, (rows.q.shape[0], None), "col_targets[0]")
    engine.check_shape(key_t, (keys.k.shape[0], row_t.shape[1]), "col_targets[1]")
    col_targets = (row_t, key_t)
  gathered = key_mode == "gather" and shards.size > 1
  if gathered:
    keys = engine.gather_keys(keys, shards)
    col_targets = None if col_targets is None else (col_targets[0], shards.all_gather(col_targets[1]))
  state, cols = _scan_both(stats, col_stats, state, rows, keys, col_targets, coef, tile_size)
  if gathered:  # [N_g] partial over this shard's rows -> this shard's keys, over every shard's rows
    cols = {name: st.merge(cols[name], shards) for name, st in col_stats.items()}
  return ({name: st.final(state[name]) for name, st in stats.items()},
          {name: st.final(cols[name]) for name, st in col_stats.items()})


# ------------------------------------------------------------------------------------------------
# The InfoNCE denominators of both directions, with a hand-written backward.


def _make_lse_core(tile_size: int):
  """`core(q, k, scale, bias, frozen) -> (row_lse [R], col_lse [N], (row_max, row_count, col_max, col_count))`: the
  LSE of each row's and each column's negatives over the tiles of `scale · q kᵀ + bias`, with its own VJP (only
  the two LSEs carry gradients). `frozen`: (rows without q, keys without k), the masks' inputs."""

  def tiles(k, frozen, *more):
    return engine.tile_keys(frozen[1]._replace(k=k), tile_size, *more)

  def neg_tile(q, kt, scale, bias, frozen):
    tile = engine.key_tile(frozen[0]._replace(q=q), kt, engine.Coef(scale, bias, jnp.ones_like(scale)))
    return tile, jnp.where(tile.neg, tile.s, -jnp.inf)  # [R, T]

  def forward(q, k, scale, bias, frozen):
    def body(carry, kt):
      m, l, c = carry
      tile, x = neg_tile(q, kt, scale, bias, frozen)
      m_new = jnp.maximum(m, jnp.max(x, axis=1))
      shift = statistics.finite_shift(m_new)
      l = l * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
      c = c + jnp.sum(tile.neg, axis=1, dtype=jnp.float32)
      col_m = jnp.max(x, axis=0)  # [T]: complete (every local row is in the tile)
      col_l = jnp.sum(jnp.exp(x - statistics.finite_shift(col_m)[None, :]), axis=0)
      return (m_new, l, c), (statistics.log_sum(col_m, col_l), col_m, jnp.sum(tile.neg, axis=0, dtype=jnp.float32))

    zeros = jnp.zeros_like(q[:, 0])  # [R]
    (m, l, c), cols = lax.scan(body, (zeros - jnp.inf, zeros, zeros), tiles(k, frozen))
    col_lse, col_max, col_count = (x.reshape(-1)[:k.shape[0]] for x in cols)
    return statistics.log_sum(m, l), col_lse, (m, c, col_max, col_count)

  @jax.custom_vjp
  def core(q, k, scale, bias, frozen):
    return forward(q, k, scale, bias, frozen)

  def core_fwd(q, k, scale, bias, frozen):
    out = forward(q, k, scale, bias, frozen)
    return out, (q, k, scale, bias, frozen, out[0], out[1])

  def core_bwd(res, g):
    q, k, scale, bias, frozen, row_lse, col_lse = res
    g_row, g_col = g[0], g[1]  # [R], [N]; the maxima and counts carry no gradient
    row_shift = statistics.finite_shift(row_lse)  # finite for a row with negatives; an empty row's entries are masked

    def body(dq_raw, x):
      kt, lse_t, g_t = x
      tile, _ = neg_tile(q, kt, scale, bias, frozen)
      # dL/dS on the negatives: each entry is in one row's and one column's softmax (each ≤ 1: s ≤ max ≤ LSE).
      p = (g_row[:, None] * jnp.exp(tile.s - row_shift[:, None]) +
           g_t[None, :] * jnp.exp(tile.s - statistics.finite_shift(lse_t)[None, :]))
      ds = jnp.where(tile.neg, p, 0.0)  # [R, T]
      dq_raw = dq_raw + jnp.dot(ds, kt.k, precision=lax.Precision.HIGHEST)  # [R, d]
      return dq_raw, scale * jnp.dot(ds.T, q, precision=lax.Precision.HIGHEST)  # dK tile [T, d]

    dq_raw, dk = lax.scan(body, jnp.zeros_like(q), tiles(k, frozen, col_lse, g_col))
    # dL/dscale = Σ_ij dS_ij q_i·k_j = Σ_i q_i·(dS K)_i; dL/dbias = Σ_ij dS_ij = the cotangents of the rows and
    # columns that have negatives (each softmax sums to 1 over them): no [R, T] reduction per tile.
    d_scale = jnp.sum(q * dq_raw)
    some = lambda lse, g: jnp.sum(jnp.where(jnp.isfinite(lse), g, 0.0))
    d_bias = some(row_lse, g_row) + some(col_lse, g_col)
    return scale * dq_raw, dk.reshape(-1, k.shape[1])[:k.shape[0]], d_scale, d_bias, None

  core.defvjp(core_fwd, core_bwd)
  return core


def lse_both(rows: engine.Rows, keys: engine.Keys, *, scale=1.0, bias=0.0, tile_size: int = 1024,
             key_mode: str = "gather", shards: engine.Shards = engine.Shards()):
  """The LSE over the negatives of every row of `S` and of `Sᵀ`, in one pass with a hand-written backward.

  What InfoNCE in both directions needs when each row has exactly one positive, its designated one
  (`rows.pos_index`; CLIP): `nll_i = softplus(lse_neg_i − s_ii)` per direction. Masks as `engine.reduce_rows`
  (ignored ids, `key_mask`, validity; the reverse direction's are the transpose).

  Args:
    rows: the local rows `q` [R, d] (no `ids`, `neg_threshold`, targets or weights: positives are designated).
    keys: the local keys `k` [N_local, d] (no targets).
    scale, bias: scalars (differentiable). tile_size, key_mode ("gather" | "local"; "ring" with one shard), shards:
      as `engine.reduce_rows`.

  Returns:
    (rows: {"lse", "max", "count"} [R], keys: {"lse", "max", "count"} [N_local]) over the negatives: the LSE
    (-inf if none; differentiable), the largest negative logit (-inf if none) and the number of negatives.
  """
  if not one_pass(key_mode, shards):
    raise ValueError("symmetric: lse_both has no ring over several shards; call reduce_rows per direction")
  if any(x is not None for x in (rows.ids, rows.neg_threshold, rows.qa, rows.pos_weights, keys.ka)) or rows.aux:
    raise ValueError("symmetric: lse_both takes designated positives only (no ids, neg_threshold, targets, weights "
                     "or aux)")
  rows, coef, _ = engine.prepare({}, rows, keys, None, scale, bias, 1.0, tile_size, key_mode)
  gathered = key_mode == "gather" and shards.size > 1
  if gathered:
    keys = engine.gather_keys(keys, shards)
  q, k, scale, bias = shards.varying((rows.q, keys.k, coef.scale, coef.bias))  # gradients summed by the casts
  row_lse, col_lse, (row_max, row_count, col_max, col_count) = _make_lse_core(tile_size)(
      q, k, scale, bias, (rows._replace(q=None), keys._replace(k=None)))
  if gathered:  # [N_g] over this shard's rows -> this shard's keys over every shard's rows
    top = statistics.finite_shift(shards.pmax(col_lse))
    col_lse = statistics.log_sum(shards.own(top), shards.psum_scatter(jnp.exp(col_lse - top)))
    col_max, col_count = shards.own(shards.pmax(col_max)), shards.psum_scatter(col_count)
  return ({"lse": row_lse, "max": row_max, "count": row_count},
          {"lse": col_lse, "max": col_max, "count": col_count})
