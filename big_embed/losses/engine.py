"""The similarity engine: row statistics of `S = scale · Q Kᵀ + bias`, tile by tile, never the N×N matrix.

Every contrastive loss in `big_embed.losses` is a few lines over per-row statistics of a similarity matrix
(DESIGN.md, "The similarity engine, concretely"):

| statistic (constructor)       | per row i                                                 | used by            |
|-------------------------------|-----------------------------------------------------------|--------------------|
| `lse(mask, fn)`               | `log Σ_{j∈mask} exp(fn(s)_ij)` (online, running max)       | InfoNCE, DEXML, KL |
| `soft(mask, fn)`              | `log Σ_j exp(a_ij)`, `E_{softmax(a)}[s]`, `E_{softmax(a)}[a]` | SoftCLIP, teacher  |
| `total(mask, fn)`, `count`    | `Σ_{j∈mask} fn(s)_ij`, `|mask_i|`                          | positives, SigLIP  |
| `maximum(mask)`, `minimum`    | `max_{j∈mask} s_ij` (no gradient)                          | accuracy, brackets |

`fn` maps the tile to any [R, T] values: sigmoid sums (`total(mask, softplus(±s))`), weighted sums
`log Σ_j w_ij e^{s_ij}` (`lse(mask, s + log w)`, PEG), sums with a per-row offset from an earlier pass
(`Rows.aux`, DEXML's decoupled denominator and soft top-k threshold). `a` is a "target" matrix,
`target_scale · Qa Kaᵀ` from other features or given per row for the extra columns; it never carries gradient.
Masks per (row, column):

* `pos`: the row's designated positive (`Rows.pos_index == Keys.index`) or a key whose id is one of the
  row's positive ids (`Rows.ids`); multiple positives are allowed.
* `neg`: every other valid column, except ignored ones: ids in `Rows.ignore_ids` (duplicates of the positive,
  non-sampled positives), columns marked in `Rows.key_mask` (by global column index), columns whose raw score
  `q·k` reaches `Rows.neg_threshold` (the false-negative filter), padded keys and padded (invalid) rows.
* `pool = pos ∪ neg` (the softmax denominator).

How it runs (`reduce_rows`): keys are padded to a multiple of `tile_size` (padded columns are masked) and
reshaped to `[n_tiles, tile, d]`; a `lax.scan` walks the tiles, its body under `jax.checkpoint`, so the
backward pass recomputes each `[rows, tile]` block instead of storing it. Activation memory is
O(rows_local × tile) plus the keys (O(N·d) all-gathered, O(N/P·d) on the ring); results do not depend on the tile
size. Per-row extra columns (`Extra`: hard negatives `[R, H, d]`, candidate sets with teacher scores) are one more
small block. A symmetric loss reads the statistics of `S` and of `Sᵀ` from the same tiles (`symmetric.py`). The
statistics themselves (`Stat`, `Tile`) live in `statistics.py`.

Sharding: call the engine inside `jax.shard_map` over the batch axes (`shard`, from `spmd`) with local queries
`[B_local, d]` and local keys. `key_mode` picks where the other devices' keys come from: "gather"
(`lax.all_gather(tiled=True)`, differentiable: its transpose is a reduce-scatter; O(N·d) per device for the
gathered keys and their gradient), "ring" (`ring.ring_pass`: the local key block is passed round the P devices
with `lax.ppermute`; its own backward passes the blocks back round the ring, recomputes each hop and carries each
block's gradient to its owner, so per-device memory is O(N/P·d + rows_local × tile) and falls as 1/P, for one more
forward of every tile and 3P−1 block transfers instead of 2(P−1); CLIP at N = 65,536, d = 512 on 8 devices: a
fifth of the gather's temporaries, benchmarks/RESULTS.md) or "local" (this device's keys only, Piccolo2's
negatives).

Losses normalise once by the global number of contributing rows (`global_mean`). Fully masked rows give
`lse = -inf` and are dropped by the loss's row mask; every division and log is guarded so that no NaN reaches
values or gradients (`where` on both branches). The (queries, keys, hard negatives, ids) layout and the InfoNCE
reductions live with the InfoNCE loss (`big_embed.losses.infonce`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.losses import ring
from big_embed.losses.spmd import Shards, global_mean, shard  # noqa: F401  (part of the engine's interface)
from big_embed.losses.statistics import (Stat, Tile, count, lse, maximum, minimum, soft, top1_accuracy,  # noqa: F401
                                         top1_stats, total)

KEY_MODES = ("gather", "ring", "local")


# ------------------------------------------------------------------------------------------------
# Inputs.


class Rows(NamedTuple):
  """The local query rows (R of them)."""

  q: jax.Array                                # [R, d] queries (float32)
  valid: jax.Array                            # [R] bool; invalid rows have empty masks
  pos_index: jax.Array | None = None          # [R] int32: `Keys.index` of the designated positive, -1 none
  ids: jax.Array | None = None                # [R, P] int32: keys with one of these ids are positives (-1 unused)
  ignore_ids: jax.Array | None = None         # [R, M] int32: keys with these ids are ignored (unless positive)
  neg_threshold: jax.Array | None = None      # [R] float32: negatives with raw q·k >= threshold are ignored
  qa: jax.Array | None = None                 # [R, da] target features (no gradient)
  aux: dict | None = None                     # per-row arrays for statistic functions, e.g. {"t": [R]}
  key_mask: jax.Array | None = None           # [R, N_g] bool by global column index (`Keys.index`): True =
                                              #   not a negative (known related); positives stay positives
  pos_weights: jax.Array | None = None        # [R, P] float: weight of the id positive `ids[:, p]` (see Tile)


class Keys(NamedTuple):
  """Key columns shared by all rows (N of them; local shard before gathering)."""

  k: jax.Array                                # [N, d] keys (float32)
  index: jax.Array                            # [N] int32 global column index (-1: never a designated positive)
  valid: jax.Array                            # [N] bool
  ids: jax.Array | None = None                # [N] int32 ids for id matching (-1: matches nothing)
  ka: jax.Array | None = None                 # [N, da] target features (no gradient)


class Extra(NamedTuple):
  """Per-row extra columns (H per row): hard negatives or a per-row candidate set."""

  k: jax.Array                                # [R, H, d]
  valid: jax.Array                            # [R, H] bool
  pos: jax.Array | None = None                # [R, H] bool: positives among them (default none)
  a: jax.Array | None = None                  # [R, H] target logits given directly (e.g. teacher scores / τ)
  ka: jax.Array | None = None                 # [R, H, da] target features (alternative to `a`)


# ------------------------------------------------------------------------------------------------
# The reduction.


class Coef(NamedTuple):
  """The logit coefficients: `s = scale · q·k + bias`, targets `target_scale · qa·ka` (float32 scalars)."""

  scale: jax.Array
  bias: jax.Array
  target_scale: jax.Array


def _match(key_ids, row_ids):
  """[R, T] bool: key_ids [T] ∈ row_ids [R, P] (entries < 0 of row_ids match nothing)."""
  hit = (key_ids[None, :, None] == row_ids[:, None, :]) & (row_ids[:, None, :] >= 0)  # [R, T, P]
  return jnp.any(hit, axis=-1)


def _masks(rows: Rows, col_valid, pos, dot, ignore):
  """pos, neg masks [R, T] from the candidate positives and ignored entries."""
  live = col_valid & rows.valid[:, None]
  pos = pos & live
  neg = live & ~pos & ~ignore
  if rows.neg_threshold is not None:
    neg = neg & (dot < rows.neg_threshold[:, None])
  return pos, neg


def key_tile(rows: Rows, kt: Keys, coef: Coef) -> Tile:
  """The [R, T] tile of the rows against one tile of keys: logits, raw dots, targets, masks (module docstring)."""
  dot = jnp.dot(rows.q, kt.k.T, precision=lax.Precision.HIGHEST)  # [R, T]
  s = coef.scale * dot + coef.bias
  a = None
  if rows.qa is not None and kt.ka is not None:
    a = coef.target_scale * jnp.dot(rows.qa, kt.ka.T, precision=lax.Precision.HIGHEST)  # [R, T]
  shape = dot.shape
  designated = jnp.zeros(shape, bool)
  if rows.pos_index is not None:
    designated = (kt.index[None, :] == rows.pos_index[:, None]) & (rows.pos_index[:, None] >= 0)
  pos = designated
  if rows.ids is not None:
    pos = pos | _match(kt.ids, rows.ids)
  ignore = jnp.zeros(shape, bool)
  if rows.ignore_ids is not None:
    ignore = _match(kt.ids, rows.ignore_ids)
  if rows.key_mask is not None:  # look the tile's columns up by their global index (-1: never masked)
    col = jnp.clip(kt.index, 0, rows.key_mask.shape[1] - 1)
    ignore = ignore | (jnp.take(rows.key_mask, col, axis=1) & (kt.index >= 0)[None, :])
  pos, neg = _masks(rows, kt.valid[None, :], pos, dot, ignore)
  weight = None
  if rows.pos_weights is not None:
    hit = (kt.ids[None, :, None] == rows.ids[:, None, :]) & (rows.ids[:, None, :] >= 0)  # [R, T, P]
    weight = jnp.sum(jnp.where(hit, rows.pos_weights[:, None, :], 0.0), axis=-1)
    weight = jnp.where(pos, jnp.where(designated, 1.0, weight), 0.0)
  return Tile(s, dot, a, pos, neg, rows.aux or {}, weight)


def _extra_tile(rows: Rows, ex: Extra, coef: Coef) -> Tile:
  dot = jnp.einsum("rd,rhd->rh", rows.q, ex.k, precision=lax.Precision.HIGHEST)  # [R, H]
  s = coef.scale * dot + coef.bias
  a = ex.a
  if a is None and rows.qa is not None and ex.ka is not None:
    a = coef.target_scale * jnp.einsum("rd,rhd->rh", rows.qa, ex.ka, precision=lax.Precision.HIGHEST)
  pos = jnp.zeros(dot.shape, bool) if ex.pos is None else ex.pos
  pos, neg = _masks(rows, ex.valid, pos, dot, jnp.zeros(dot.shape, bool))
  weight = None if rows.pos_weights is None else pos.astype(jnp.float32)
  return Tile(s, dot, a, pos, neg, rows.aux or {}, weight)


def update_all(stats, state, tile):
  """Every statistic's state after one more tile."""
  return {name: st.update(state[name], tile) for name, st in stats.items()}


def tile_keys(keys: Keys, tile_size: int, *more: jax.Array | None):
  """Pads keys to a multiple of the tile (padded keys invalid) and reshapes to [n_tiles, tile, ...]; with `more`
  arrays [N, ...] (zero-padded the same way), returns (keys, *more)."""
  n = keys.k.shape[0]
  tile = max(1, min(int(tile_size), n))
  n_tiles = -(-n // tile)
  pad = n_tiles * tile - n

  def p(x, value=0.0):
    if x is None:
      return None
    if pad:
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
    return x.reshape((n_tiles, tile) + x.shape[1:])

  tiled = Keys(k=p(keys.k), index=p(keys.index, -1), valid=p(keys.valid, False), ids=p(keys.ids, -1), ka=p(keys.ka))
  return (tiled, *map(p, more)) if more else tiled


def _scan_keys(stats, state, rows: Rows, keys: Keys, coef: Coef, tile_size: int):
  """Folds every tile of `keys` into the statistics; the tile body is rematerialised in the backward pass."""
  if keys.k.shape[0] == 0:
    return state

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot undo the remat
  def body(rows, coef, state, kt):
    return update_all(stats, state, key_tile(rows, kt, coef))

  state, _ = lax.scan(lambda c, kt: (body(rows, coef, c, kt), None), state, tile_keys(keys, tile_size))
  return state


def gather_keys(keys: Keys, shards: Shards) -> Keys:
  """All-gathers the local key shard (differentiable: the transpose is a reduce-scatter)."""
  return jax.tree.map(shards.all_gather, keys)


def check_shape(x, shape, what):
  """None, or an array of `shape` (None entries are free)."""
  if x is not None and (x.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, x.shape))):
    raise ValueError(f"engine: {what} must be [{', '.join('?' if n is None else str(n) for n in shape)}], "
                     f"got {x.shape}")


def _check_inputs(rows: Rows, keys: Keys | None, extra: Extra | None):
  r, d = rows.q.shape
  for name, shape in (("valid", (r,)), ("pos_index", (r,)), ("neg_threshold", (r,)), ("ids", (r, None)),
                      ("ignore_ids", (r, None)), ("key_mask", (r, None)), ("qa", (r, None))):
    check_shape(getattr(rows, name), shape, f"rows.{name}")
  if (rows.ids is not None or rows.ignore_ids is not None) and (keys is None or keys.ids is None):
    raise ValueError("engine: rows.ids / rows.ignore_ids need key ids (Keys.ids)")
  if rows.pos_weights is not None:
    check_shape(rows.pos_weights, (r, 0) if rows.ids is None else rows.ids.shape, "rows.pos_weights (as rows.ids)")
  da = None if rows.qa is None else rows.qa.shape[1]
  if keys is not None:
    n = keys.k.shape[0]
    for name, shape in (("k", (n, d)), ("index", (n,)), ("valid", (n,)), ("ids", (n,)), ("ka", (n, da))):
      check_shape(getattr(keys, name), shape, f"keys.{name}")
    if (rows.qa is None) != (keys.ka is None):
      raise ValueError("engine: target features must be given for both rows (qa) and keys (ka), or neither")
  if extra is not None:
    check_shape(extra.k, (r, None, d), "extra.k")
    h = extra.k.shape[1]
    for name, shape in (("valid", (r, h)), ("pos", (r, h)), ("a", (r, h)), ("ka", (r, h, da))):
      check_shape(getattr(extra, name), shape, f"extra.{name}")


def prepare(stats, rows: Rows, keys, extra, scale, bias, target_scale, tile_size, key_mode):
  """Checks the inputs; (rows with stop-gradient targets, the coefficients, the initial [R] states)."""
  if key_mode not in KEY_MODES:
    raise ValueError(f"engine: key_mode must be one of {KEY_MODES}, got {key_mode!r}")
  if not (isinstance(tile_size, int) and tile_size >= 1):
    raise ValueError(f"engine: tile_size must be a positive int, got {tile_size!r}")
  _check_inputs(rows, keys, extra)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  coef = Coef(f32(scale), f32(bias), f32(target_scale))
  if rows.qa is not None:
    rows = rows._replace(qa=lax.stop_gradient(rows.qa))
  zeros = jnp.zeros_like(rows.q[:, 0])  # [R], carries the row sharding (varying over the batch axes)
  return rows, coef, {name: st.init(zeros) for name, st in stats.items()}


def frozen_targets(keys: Keys) -> Keys:
  """The keys with stop-gradient target features."""
  return keys if keys.ka is None else keys._replace(ka=lax.stop_gradient(keys.ka))


def reduce_rows(stats: dict[str, Stat], rows: Rows, keys: Keys | None = None, extra: Extra | None = None, *,
                scale=1.0, bias=0.0, target_scale=1.0, tile_size: int = 1024, key_mode: str = "gather",
                shards: Shards = Shards()) -> dict[str, Any]:
  """Row statistics of `s = scale · q kᵀ + bias` over every key column (and per-row extra columns).

  Args:
    stats: name -> `Stat` (see `lse`, `soft`, `total`, `count`, `maximum`, `minimum`).
    rows: the local query rows, `q` [R, d].
    keys: the local shard of the shared key columns, `k` [N_local, d] (or None: only `extra` columns).
    extra: per-row extra columns, `k` [R, H, d] (or None).
    scale, bias: scalars (differentiable) of the logits. target_scale: multiplies `qa · ka` for targets.
    tile_size: key columns per tile (any positive int; keys are padded and padded columns masked).
    key_mode: "gather" | "ring" | "local" (see the module docstring).
    shards: the batch axes (`Shards()` outside shard_map).

  Returns:
    name -> the statistic's final value, [R] arrays (a dict of them for `soft`).
  """
  rows, coef, state = prepare(stats, rows, keys, extra, scale, bias, target_scale, tile_size, key_mode)
  if keys is not None:
    keys = frozen_targets(keys)
    if key_mode == "gather":
      state = _scan_keys(stats, state, rows, gather_keys(keys, shards), coef, tile_size)
    elif key_mode == "local" or shards.size == 1:
      state = _scan_keys(stats, state, rows, keys, coef, tile_size)
    else:  # ring: the key blocks travel round the shards; only the keys `k` get gradients
      def hop(state, fixed, block):
        (rows_, coef_), (k, rest) = fixed, block
        return _scan_keys(stats, state, rows_, rest._replace(k=k), coef_, tile_size)

      state = ring.ring_pass(hop, state, (rows, coef), (keys.k, keys._replace(k=None)), shards)

  if extra is not None:
    if extra.ka is not None:
      extra = extra._replace(ka=lax.stop_gradient(extra.ka))
    if extra.a is not None:
      extra = extra._replace(a=lax.stop_gradient(extra.a))
    state = update_all(stats, state, _extra_tile(rows, extra, coef))
  return {name: st.final(state[name]) for name, st in stats.items()}

