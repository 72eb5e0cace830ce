"""The similarity engine: row statistics of `S = scale · Q Kᵀ + bias`, tile by tile, never the N×N matrix.

Every contrastive loss in `big_embed.losses` is a few lines over per-row statistics of a similarity matrix
(DESIGN.md, "The similarity engine, concretely"):

| statistic (constructor)       | per row i                                                | used by                      |
|-------------------------------|----------------------------------------------------------|------------------------------|
| `lse(mask, fn)`               | `log Σ_{j∈mask} exp(fn(s)_ij)` (online, running max)      | InfoNCE, SoftCLIP, DEXML, KL  |
| `soft(mask, fn)`              | `log Σ_j exp(a_ij)`, `E_{softmax(a)}[s]`, `E_{softmax(a)}[a]` | SoftCLIP, LightCLIP, teacher |
| `total(mask, fn)`, `count`    | `Σ_{j∈mask} fn(s)_ij`, `|mask_i|`                         | positives, SigLIP softplus    |
| `maximum(mask)`, `minimum`    | `max_{j∈mask} s_ij`                                       | accuracy, top-k bracket       |

`fn` maps the tile to any [R, T] values, which covers the other rows of DESIGN.md's table: sigmoid sums
(`total(mask, softplus(±s))`, SigLIP), weighted sums `log Σ_j w_ij e^{s_ij}` (`lse(mask, s + log w)`, PEG's
hardness weights), sums with a per-row offset from an earlier pass (`Rows.aux`, DEXML's decoupled
denominator and soft top-k threshold).

`a` is a second "target" matrix, `target_scale · Qa Kaᵀ` from other features (intra-modal or teacher
embeddings) or given per row for the extra columns; targets never carry gradient. Masks per (row, column):

* `pos`: the row's designated positive (`Rows.pos_index == Keys.index`) or a key whose id is one of the
  row's positive ids (`Rows.ids`); multiple positives are allowed.
* `neg`: every other valid column, except ignored ones: ids in `Rows.ignore_ids` (duplicates of the
  positive, non-sampled positives), columns whose raw score `q·k` reaches `Rows.neg_threshold` (the
  false-negative filter), padded keys and padded (invalid) rows.
* `pool = pos ∪ neg` (the softmax denominator).

How it runs (`reduce_rows`): keys are padded to a multiple of `tile_size` (padded columns are masked) and
reshaped to `[n_tiles, tile, d]`; a `lax.scan` walks the tiles, its body under `jax.checkpoint`, so the
backward pass recomputes each `[rows, tile]` block instead of storing it. Activation memory is
O(rows_local × tile) plus O(N·d) for the keys; results do not depend on the tile size. Per-row extra
columns (`Extra`: hard negatives `[R, H, d]`, candidate sets with teacher scores) are one more small block.

Sharding: call the engine inside `jax.shard_map` over the batch axes (`shard` does this) with local queries
`[B_local, d]` and local keys. `key_mode` picks where the other devices' keys come from:

* "gather": `lax.all_gather(tiled=True)` (differentiable; its transpose is a reduce-scatter), then tiles;
* "ring":   the local key block is passed round the devices with `lax.ppermute`, W−1 hops, tiles of each
            block in turn: no all-gathered buffer, one block in flight (autodiff keeps each hop's block
            for the backward pass, O(N·d) like the gather);
* "local":  only this device's keys (per-device negatives, as in Piccolo2).

Losses normalise once by the global number of contributing rows (`global_mean`: psum of sums / psum of
counts). Fully masked rows give `lse = -inf` and are dropped by the loss's row mask; every division and log is
guarded so that no NaN reaches values or gradients (`where` on both branches).

For a loss author, `info_nce` / `info_nce_local` is the ready-made InfoNCE over (queries, keys, optional hard
negatives, optional ids); `retrieval_layout` builds the engine inputs for the same setting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from big_embed.parallel.mesh import BATCH_AXES

KEY_MODES = ("gather", "ring", "local")
DUPLICATES = ("ignore", "positive")
MULTI_POSITIVE = ("mean", "lse")
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# Devices.


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

  def index(self):
    return lax.axis_index(self.axes) if self.axes else 0

  def psum(self, x):
    return lax.psum(x, self.axes) if self.axes else x

  def all_gather(self, x):
    return lax.all_gather(x, self.axes, tiled=True) if self.axes else x

  def to_next(self, x):
    """Sends this shard's `x` to shard index+1 (a ring step)."""
    if self.size == 1:
      return x
    return lax.ppermute(x, self.axes, [(i, (i + 1) % self.size) for i in range(self.size)])


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


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(‖x‖, eps) over the last axis in float32, safe (finite gradient) for zero rows."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


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


class Tile(NamedTuple):
  """One [R, T] block as the statistics see it."""

  s: jax.Array                                # [R, T] logits scale·q·k + bias
  dot: jax.Array                              # [R, T] raw q·k
  a: jax.Array | None                         # [R, T] target logits or None
  pos: jax.Array                              # [R, T] bool
  neg: jax.Array                              # [R, T] bool
  aux: dict                                   # per-row arrays [R]

  @property
  def pool(self):
    return self.pos | self.neg

  def mask(self, name: str) -> jax.Array:
    return {"pos": self.pos, "neg": self.neg, "pool": self.pool}[name]


# ------------------------------------------------------------------------------------------------
# Statistics: (init, update, final) triples over [R] states.


class Stat(NamedTuple):
  init: Callable[[jax.Array], Any]            # zeros [R] -> state
  update: Callable[[Any, Tile], Any]          # state, tile -> state
  final: Callable[[Any], Any]                 # state -> [R] array(s)


def _values(tile: Tile, fn):
  return tile.s if fn is None else fn(tile)


def _shift(m):
  """A finite shift for a running max that may be -inf (empty so far)."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


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
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(x, axis=1)))
    shift = _shift(m_new)
    l = l * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
    return m_new, l

  def final(state):
    m, l = state
    some = l > 0
    return jnp.where(some, _shift(m) + jnp.log(jnp.where(some, l, 1.0)), -jnp.inf)

  return Stat(init, update, final)


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
    m_new = jnp.maximum(m, jnp.max(am, axis=1))
    shift = _shift(m_new)
    c = jnp.exp(m - shift)
    w = jnp.exp(am - shift[:, None])  # [R, T], 0 where masked
    l = l * c + jnp.sum(w, axis=1)
    es = es * c + jnp.sum(w * jnp.where(msk, tile.s, 0.0), axis=1)
    ea = ea * c + jnp.sum(w * jnp.where(msk, a, 0.0), axis=1)
    return m_new, l, es, ea

  def final(state):
    m, l, es, ea = state
    some = l > 0
    safe_l = jnp.where(some, l, 1.0)
    return {"lse": jnp.where(some, _shift(m) + jnp.log(safe_l), -jnp.inf), "s": es / safe_l, "a": ea / safe_l}

  return Stat(init, update, final)


def total(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`Σ_{j∈mask} x_ij`, x = fn(tile) (default the logits). fn must be finite on masked entries."""
  _check_mask(mask)
  return Stat(lambda z: z,
              lambda acc, tile: acc + jnp.sum(jnp.where(tile.mask(mask), _values(tile, fn), 0.0), axis=1),
              lambda acc: acc)


def count(mask: str = "pool") -> Stat:
  """`|mask_i|` as float32."""
  _check_mask(mask)
  return Stat(lambda z: z, lambda acc, tile: acc + jnp.sum(tile.mask(mask), axis=1, dtype=jnp.float32),
              lambda acc: acc)


def maximum(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`max_{j∈mask} x_ij` (-inf if empty). For metrics and brackets: gradients are not meant to flow."""
  _check_mask(mask)
  return Stat(lambda z: z - jnp.inf,
              lambda m, tile: jnp.maximum(
                  m, jnp.max(jnp.where(tile.mask(mask), lax.stop_gradient(_values(tile, fn)), -jnp.inf), 1)),
              lambda m: m)


def minimum(mask: str = "pool", fn: Callable[[Tile], jax.Array] | None = None) -> Stat:
  """`min_{j∈mask} x_ij` (+inf if empty), no gradient."""
  _check_mask(mask)
  return Stat(lambda z: z + jnp.inf,
              lambda m, tile: jnp.minimum(
                  m, jnp.min(jnp.where(tile.mask(mask), lax.stop_gradient(_values(tile, fn)), jnp.inf), 1)),
              lambda m: m)


# ------------------------------------------------------------------------------------------------
# The reduction.


class _Coef(NamedTuple):
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


def _key_tile(rows: Rows, kt: Keys, coef: _Coef) -> Tile:
  dot = jnp.dot(rows.q, kt.k.T, precision=lax.Precision.HIGHEST)  # [R, T]
  s = coef.scale * dot + coef.bias
  a = None
  if rows.qa is not None and kt.ka is not None:
    a = coef.target_scale * jnp.dot(rows.qa, kt.ka.T, precision=lax.Precision.HIGHEST)  # [R, T]
  shape = dot.shape
  pos = jnp.zeros(shape, bool)
  if rows.pos_index is not None:
    pos = pos | ((kt.index[None, :] == rows.pos_index[:, None]) & (rows.pos_index[:, None] >= 0))
  if rows.ids is not None:
    pos = pos | _match(kt.ids, rows.ids)
  ignore = jnp.zeros(shape, bool)
  if rows.ignore_ids is not None:
    ignore = _match(kt.ids, rows.ignore_ids)
  pos, neg = _masks(rows, kt.valid[None, :], pos, dot, ignore)
  return Tile(s, dot, a, pos, neg, rows.aux or {})


def _extra_tile(rows: Rows, ex: Extra, coef: _Coef) -> Tile:
  dot = jnp.einsum("rd,rhd->rh", rows.q, ex.k, precision=lax.Precision.HIGHEST)  # [R, H]
  s = coef.scale * dot + coef.bias
  a = ex.a
  if a is None and rows.qa is not None and ex.ka is not None:
    a = coef.target_scale * jnp.einsum("rd,rhd->rh", rows.qa, ex.ka, precision=lax.Precision.HIGHEST)
  pos = jnp.zeros(dot.shape, bool) if ex.pos is None else ex.pos
  pos, neg = _masks(rows, ex.valid, pos, dot, jnp.zeros(dot.shape, bool))
  return Tile(s, dot, a, pos, neg, rows.aux or {})


def _update(stats, state, tile):
  return {name: st.update(state[name], tile) for name, st in stats.items()}


def _tiles(keys: Keys, tile_size: int) -> Keys:
  """Pads keys to a multiple of the tile (padded keys invalid) and reshapes to [n_tiles, tile, ...]."""
  n = keys.k.shape[0]
  tile = max(1, min(int(tile_size), n))
  n_tiles = -(-n // tile)
  pad = n_tiles * tile - n

  def p(x, value):
    if x is None:
      return None
    if pad:
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
    return x.reshape((n_tiles, tile) + x.shape[1:])

  return Keys(k=p(keys.k, 0.0), index=p(keys.index, -1), valid=p(keys.valid, False), ids=p(keys.ids, -1),
              ka=p(keys.ka, 0.0))


def _scan_keys(stats, state, rows: Rows, keys: Keys, coef: _Coef, tile_size: int):
  """Folds every tile of `keys` into the statistics; the tile body is rematerialised in the backward pass."""
  if keys.k.shape[0] == 0:
    return state

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan CSE cannot undo the remat
  def body(rows, coef, state, kt):
    return _update(stats, state, _key_tile(rows, kt, coef))

  state, _ = lax.scan(lambda c, kt: (body(rows, coef, c, kt), None), state, _tiles(keys, tile_size))
  return state


def _like_rows(tree, zeros):
  """Adds a (shard-varying) zero to every leaf, so that scan carries keep one type under shard_map."""
  z = zeros[0]

  def f(x):
    if x.dtype == jnp.bool_:
      return x | (z != 0)
    return x + z.astype(x.dtype)

  return jax.tree.map(f, tree)


def gather_keys(keys: Keys, shards: Shards) -> Keys:
  """All-gathers the local key shard (differentiable: the transpose is a reduce-scatter)."""
  return jax.tree.map(shards.all_gather, keys)


def _check_inputs(rows: Rows, keys: Keys | None, extra: Extra | None):
  r, d = rows.q.shape
  if rows.valid.shape != (r,):
    raise ValueError(f"engine: row valid mask must be [{r}], got {rows.valid.shape}")
  for name in ("pos_index", "neg_threshold"):
    x = getattr(rows, name)
    if x is not None and x.shape != (r,):
      raise ValueError(f"engine: rows.{name} must be [{r}], got {x.shape}")
  for name in ("ids", "ignore_ids"):
    x = getattr(rows, name)
    if x is not None and (x.ndim != 2 or x.shape[0] != r):
      raise ValueError(f"engine: rows.{name} must be [{r}, P], got {x.shape}")
    if x is not None and (keys is None or keys.ids is None):
      raise ValueError(f"engine: rows.{name} needs key ids (Keys.ids)")
  if keys is not None:
    n = keys.k.shape[0]
    if keys.k.ndim != 2 or keys.k.shape[1] != d:
      raise ValueError(f"engine: keys must be [N, {d}] like the queries [R, {d}], got {keys.k.shape}")
    for name in ("index", "valid", "ids"):
      x = getattr(keys, name)
      if x is not None and x.shape != (n,):
        raise ValueError(f"engine: keys.{name} must be [{n}], got {x.shape}")
    if (rows.qa is None) != (keys.ka is None):
      raise ValueError("engine: target features must be given for both rows (qa) and keys (ka), or neither")
    if keys.ka is not None and (keys.ka.shape[0] != n or keys.ka.shape[1] != rows.qa.shape[1]):
      raise ValueError(f"engine: keys.ka must be [{n}, {rows.qa.shape[1]}], got {keys.ka.shape}")
  if extra is not None:
    if extra.k.ndim != 3 or extra.k.shape[0] != r or extra.k.shape[2] != d:
      raise ValueError(f"engine: extra keys must be [{r}, H, {d}], got {extra.k.shape}")
    h = extra.k.shape[1]
    for name in ("valid", "pos", "a"):
      x = getattr(extra, name)
      if x is not None and x.shape != (r, h):
        raise ValueError(f"engine: extra.{name} must be [{r}, {h}], got {x.shape}")


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
  if key_mode not in KEY_MODES:
    raise ValueError(f"engine: key_mode must be one of {KEY_MODES}, got {key_mode!r}")
  if not (isinstance(tile_size, int) and tile_size >= 1):
    raise ValueError(f"engine: tile_size must be a positive int, got {tile_size!r}")
  _check_inputs(rows, keys, extra)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  coef = _Coef(f32(scale), f32(bias), f32(target_scale))
  if rows.qa is not None:
    rows = rows._replace(qa=lax.stop_gradient(rows.qa))
  zeros = jnp.zeros_like(rows.q[:, 0])  # [R], carries the row sharding (varying over the batch axes)
  state = {name: st.init(zeros) for name, st in stats.items()}

  if keys is not None:
    if keys.ka is not None:
      keys = keys._replace(ka=lax.stop_gradient(keys.ka))
    if key_mode == "gather":
      state = _scan_keys(stats, state, rows, gather_keys(keys, shards), coef, tile_size)
    elif key_mode == "local" or shards.size == 1:
      state = _scan_keys(stats, state, rows, keys, coef, tile_size)
    else:  # ring: own block first, then W-1 hops of the neighbour's block
      state = _scan_keys(stats, state, rows, keys, coef, tile_size)
      keys = _like_rows(keys, zeros)  # the block changes from shard to shard: make every leaf shard-varying

      def hop(carry, _):
        block, state = carry
        block = jax.tree.map(shards.to_next, block)
        return (block, _scan_keys(stats, state, rows, block, coef, tile_size)), None

      (_, state), _ = lax.scan(hop, (keys, state), None, length=shards.size - 1)

  if extra is not None:
    if extra.ka is not None:
      extra = extra._replace(ka=lax.stop_gradient(extra.ka))
    if extra.a is not None:
      extra = extra._replace(a=lax.stop_gradient(extra.a))
    state = _update(stats, state, _extra_tile(rows, extra, coef))
  return {name: st.final(state[name]) for name, st in stats.items()}


# ------------------------------------------------------------------------------------------------
# Layout of the common (queries, keys, hard negatives, ids) setting.


def _bool(x, shape):
  return jnp.ones(shape, bool) if x is None else jnp.asarray(x).astype(bool)


def retrieval_layout(queries, keys, *, shards: Shards, valid=None, ids=None, duplicates: str = "ignore",
                     shared_negatives=None, shared_negatives_valid=None, row_negatives=None,
                     row_negatives_valid=None, query_targets=None, key_targets=None,
                     row_negative_targets=None) -> tuple[Rows, Keys, Extra | None]:
  """Engine inputs for "row i's positive is key i" with optional ids and hard negatives (local shards).

  Args:
    queries, keys: [B, d] local shards; key i is the designated positive of query i.
    valid: [B] bool (a padded pair is neither a row nor a column).
    ids: [B] int item ids of the pairs (>= 0; -1 = no id). Another key with the row's id is a duplicate:
      ignored (`duplicates="ignore"`) or an extra positive (`"positive"`).
    shared_negatives: [M, d] negatives shared by every row (a column for all rows), valid [M].
    row_negatives: [B, H, d] per-row negatives (extra columns of their row only), valid [B, H].
    query_targets, key_targets, row_negative_targets: [B, da], [B, da], [B, H, da] target features.
  Returns:
    (Rows, Keys, Extra or None) for `reduce_rows`.
  """
  if duplicates not in DUPLICATES:
    raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
  b, d = queries.shape
  if keys.shape != (b, d):
    raise ValueError(f"keys must have the queries' shape {(b, d)}, got {keys.shape}")
  valid = _bool(valid, (b,))
  if valid.shape != (b,):
    raise ValueError(f"valid must be [{b}], got {valid.shape}")
  index = shards.index() * b + jnp.arange(b, dtype=jnp.int32)  # [B] global pair index
  q = queries.astype(jnp.float32)
  k = keys.astype(jnp.float32)
  row_ids = None
  key_ids = None
  if ids is not None:
    ids = jnp.asarray(ids).astype(jnp.int32)
    if ids.shape != (b,):
      raise ValueError(f"ids must be [{b}] (one id per pair), got {ids.shape}")
    row_ids = ids[:, None]  # [B, 1]
    key_ids = ids
  kvalid, kindex, ka = valid, index, key_targets
  if shared_negatives is not None:
    m = shared_negatives.shape[0]
    if shared_negatives.ndim != 2 or shared_negatives.shape[1] != d:
      raise ValueError(f"shared negatives must be [M, {d}], got {shared_negatives.shape}")
    nvalid = _bool(shared_negatives_valid, (m,))
    if nvalid.shape != (m,):
      raise ValueError(f"shared negatives' valid mask must be [{m}], got {nvalid.shape}")
    k = jnp.concatenate([k, shared_negatives.astype(jnp.float32)], axis=0)  # [B + M, d]
    kvalid = jnp.concatenate([valid, nvalid])
    kindex = jnp.concatenate([index, jnp.full((m,), -1, jnp.int32)])
    if key_ids is not None:
      key_ids = jnp.concatenate([key_ids, jnp.full((m,), -1, jnp.int32)])
    if ka is not None:
      raise ValueError("target features with shared negatives are not supported")
  rows = Rows(q=q, valid=valid, pos_index=index, qa=query_targets,
              ids=row_ids if duplicates == "positive" else None,
              ignore_ids=row_ids if duplicates == "ignore" else None)
  cols = Keys(k=k, index=kindex, valid=kvalid, ids=key_ids, ka=ka)
  extra = None
  if row_negatives is not None:
    if row_negatives.ndim != 3 or row_negatives.shape[0] != b or row_negatives.shape[2] != d:
      raise ValueError(f"row negatives must be [{b}, H, {d}], got {row_negatives.shape}")
    h = row_negatives.shape[1]
    rvalid = _bool(row_negatives_valid, (b, h))
    if rvalid.shape != (b, h):
      raise ValueError(f"row negatives' valid mask must be [{b}, {h}], got {rvalid.shape}")
    extra = Extra(k=row_negatives.astype(jnp.float32), valid=rvalid, ka=row_negative_targets)
  return rows, cols, extra


# ------------------------------------------------------------------------------------------------
# InfoNCE, the building block most losses share.


def contrastive_stats(multi_positive: str = "mean") -> dict[str, Stat]:
  """Statistics for InfoNCE rows: positive and negative LSEs, positive sums/counts and the top-1 metric."""
  if multi_positive not in MULTI_POSITIVE:
    raise ValueError(f"multi_positive must be one of {MULTI_POSITIVE}, got {multi_positive!r}")
  return {"pos_lse": lse("pos"), "neg_lse": lse("neg"), "pos_sum": total("pos"), "pos_count": count("pos"),
          "pos_max": maximum("pos"), "neg_max": maximum("neg")}


def contrastive_nll(st: dict, multi_positive: str = "mean"):
  """Per-row InfoNCE from `contrastive_stats`.

  nll_i = lse_i − mean_{p∈P_i} s_ip ("mean": every positive a target, SupCon-out style; one positive: the
  usual −log softmax) or lse_i − log Σ_{p∈P_i} exp(s_ip) ("lse": −log of the positives' total probability),
  with lse_i the pool's LSE. Computed as logaddexp(lse_pos − target, lse_neg − target) so that a dominant
  positive (e.g. τ = 0.01) does not cancel two large, nearly equal numbers: with one positive this is
  softplus(lse_neg − s_ip), exact in float32.
  Returns nll [R] (0 on rows without a positive), ok [R] bool (row has a positive), correct [R] float
  (top-1 column is a positive).
  """
  ok = st["pos_count"] > 0
  if multi_positive == "mean":
    target = st["pos_sum"] / jnp.maximum(st["pos_count"], 1.0)
  else:
    target = st["pos_lse"]
  target = jnp.where(ok, target, 0.0)
  pos_part = jnp.where(ok, st["pos_lse"], 0.0) - target  # >= 0; exactly 0 with one positive
  nll = jnp.where(ok, jnp.logaddexp(pos_part, st["neg_lse"] - target), 0.0)
  correct = (ok & (st["pos_max"] >= st["neg_max"])).astype(jnp.float32)
  return nll, ok, correct


def info_nce_local(queries, keys, *, shards: Shards = Shards(), scale=1.0, valid=None, ids=None,
                   duplicates: str = "ignore", multi_positive: str = "mean", hard_negatives=None,
                   hard_negatives_valid=None, row_negatives=None, row_negatives_valid=None,
                   neg_threshold=None, tile_size: int = 1024, key_mode: str = "gather"):
  """InfoNCE of local queries against keys (all devices' keys unless key_mode="local"); see `info_nce`.

  Call inside `shard_map` (pass `shards`) or on plain arrays (`Shards()`). Returns (loss, metrics).
  """
  rows, cols, extra = retrieval_layout(
      queries, keys, shards=shards, valid=valid, ids=ids, duplicates=duplicates,
      shared_negatives=hard_negatives, shared_negatives_valid=hard_negatives_valid,
      row_negatives=row_negatives, row_negatives_valid=row_negatives_valid)
  if neg_threshold is not None:
    rows = rows._replace(neg_threshold=jnp.asarray(neg_threshold, jnp.float32))
  st = reduce_rows(contrastive_stats(multi_positive), rows, cols, extra, scale=scale, tile_size=tile_size,
                   key_mode=key_mode, shards=shards)
  nll, ok, correct = contrastive_nll(st, multi_positive)
  loss = global_mean(nll, ok, shards)
  return loss, {"loss": loss, "accuracy": global_mean(correct, ok, shards),
                "rows": shards.psum(jnp.sum(ok, dtype=jnp.float32))}


def info_nce(queries, keys, hard_negatives=None, ids=None, *, scale=None, temperature=None, mesh=None,
             key_mode: str = "local", tile_size: int = 1024, valid=None, hard_negatives_valid=None,
             row_negatives=None, row_negatives_valid=None, duplicates: str = "ignore",
             multi_positive: str = "mean", normalize: bool = False):
  """InfoNCE over (queries, keys, optional hard negatives, optional ids) on global arrays, tiled.

  `L = mean_i [ log Σ_{j∈pool_i} exp(ℓ_ij) − ℓ_{i,i} ]`, ℓ = scale · q·k, where pool_i = every key column
  (the in-batch positives of the other rows and all `hard_negatives`, shared by every row) plus row i's own
  `row_negatives`; van den Oord et al. 2018, as used by Piccolo2's retrieval branch (arXiv 2405.06932 §3.3:
  τ = 0.01, in-batch + shared hard negatives, no cross-device gathering, no symmetric term).

  Args:
    queries: [B, D]. keys: [B, D]; keys[i] is the positive of queries[i].
    hard_negatives: optional [M, D] (e.g. Piccolo2's [B·k, D]) negatives for every row.
    ids: optional int [B] pair ids; a key sharing row i's id is ignored (`duplicates="ignore"`) or also a
      positive (`"positive"`, then `multi_positive` "mean" | "lse" reduces over positives).
    scale or temperature: logit scale (= 1/temperature); a float or a scalar (differentiable) array.
    mesh: None computes on whatever device holds the arrays (one shard). With a mesh the batch dim of every
      array is split over the mesh's batch axes and `key_mode` says which keys a shard sees: "local" (its own
      keys and hard negatives only: Piccolo2's per-device negatives), "gather" (every shard's) or "ring".
    tile_size: key columns per tile (memory O(B_local × tile_size)).
    valid: optional bool [B]; hard_negatives_valid: [M]; row_negatives: [B, H, D] with valid [B, H].
    normalize: L2-normalise every input first (cosine similarities).
  Returns:
    (loss, metrics): loss averaged over the rows that have a positive, metrics {"loss", "accuracy", "rows"}.
  """
  if (scale is None) == (temperature is None):
    raise ValueError("info_nce: give exactly one of scale, temperature")
  if temperature is not None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
      raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    scale = 1.0 / jnp.asarray(temperature, jnp.float32)
  prep = l2_normalize if normalize else (lambda x: x.astype(jnp.float32))
  sharded = {"queries": prep(queries), "keys": prep(keys)}
  opt = {"ids": ids, "valid": valid, "hard_negatives": None if hard_negatives is None else prep(hard_negatives),
         "hard_negatives_valid": hard_negatives_valid,
         "row_negatives": None if row_negatives is None else prep(row_negatives),
         "row_negatives_valid": row_negatives_valid}
  sharded.update({k: jnp.asarray(v) for k, v in opt.items() if v is not None})

  def local(s, r, shards):
    return info_nce_local(
        s["queries"], s["keys"], shards=shards, scale=r["scale"], valid=s.get("valid"), ids=s.get("ids"),
        duplicates=duplicates, multi_positive=multi_positive, hard_negatives=s.get("hard_negatives"),
        hard_negatives_valid=s.get("hard_negatives_valid"), row_negatives=s.get("row_negatives"),
        row_negatives_valid=s.get("row_negatives_valid"), tile_size=tile_size, key_mode=key_mode)

  return shard(local, mesh, sharded, {"scale": jnp.asarray(scale, jnp.float32)})
