"""The one-pass symmetric reductions (`losses/symmetric.py`) against dense full-matrix references: the statistics
of `S` and of `Sᵀ`, values and gradients, on 1 and 8 devices (all-gathered keys, per-device keys, a two-axis
mesh), with invalid pairs, ignored duplicates, a key mask and tiles that do not divide the keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_embed.losses import engine
from big_embed.losses import infonce
from big_embed.losses import symmetric
from big_embed.parallel.mesh import make_mesh
from tests.losses import util

B, D, DA = 24, 6, 4
SCALE, BIAS, TARGET_SCALE = 3.0, -0.5, 2.0


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  a, b = (unit(rng.normal(size=(B, D))).astype(np.float32) for _ in range(2))
  ta, tb = (unit(rng.normal(size=(B, DA))).astype(np.float32) for _ in range(2))
  valid = np.ones(B, bool)
  valid[[3, 17]] = False
  ids = np.arange(B, dtype=np.int32)
  ids[[5, 9, 20]] = 1  # duplicates of pair 1
  key_mask = rng.random((B, B)) < 0.2
  w_row, w_col = (rng.normal(size=B).astype(np.float32) for _ in range(2))
  return dict(a=a, b=b, ta=ta, tb=tb, valid=valid, ids=ids, key_mask=key_mask, w_row=w_row, w_col=w_col)


def _masks(x, positives_by_id):
  """Dense pos, neg [B, B] of the a→b direction; b→a's are their transposes."""
  valid, ids = jnp.asarray(x["valid"]), jnp.asarray(x["ids"])
  live = valid[:, None] & valid[None, :]
  same = ids[:, None] == ids[None, :]
  pos = (jnp.eye(B, dtype=bool) | (same if positives_by_id else False)) & live
  ignored = (jnp.zeros((B, B), bool) if positives_by_id else same) | jnp.asarray(x["key_mask"])
  return pos, live & ~pos & ~ignored


def _dense_lse(v, m, axis):
  return jax.nn.logsumexp(jnp.where(m, v, -jnp.inf), axis=axis)


def _finite(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


# ------------------------------------------------------------------------------------------------
# lse_both: the negatives' LSE, max and count of both directions, hand-written backward.


def _dense_lse_both(a, b, scale, bias, x):
  s = scale * a @ b.T + bias
  _, neg = _masks(x, positives_by_id=False)
  return tuple({"lse": _dense_lse(s, neg, ax), "max": jnp.max(jnp.where(neg, s, -jnp.inf), axis=ax),
           "count": jnp.sum(neg, axis=ax).astype(jnp.float32)} for ax in (1, 0))


def _objective(out, x):
  """A weighted sum of both directions' (finite) LSEs: its gradient reaches every path of the backward."""
  return jnp.sum(x["w_row"] * _finite(out[0]["lse"])) + jnp.sum(x["w_col"] * _finite(out[1]["lse"]))


@functools.lru_cache(maxsize=None)
def _mesh(shape: tuple):
  n = int(np.prod([s for _, s in shape]))
  return make_mesh(dict(shape), devices=jax.devices()[:n])


def _sharded(fn, mesh_shape, n_out_trees=2):
  """fn(a, b, scale, bias, valid, ids, key_mask, extra...) -> (rows dict, keys dict) run per shard, rows back whole."""
  if mesh_shape is None:
    return fn
  mesh = _mesh(mesh_shape)
  axes = engine.Shards.of(mesh).axes
  row = P(axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=(row, row, P(), P(), row, row, row, row, row),
                       out_specs=tuple(row for _ in range(n_out_trees)))


def _run_lse_both(x, mesh_shape, key_mode, tile):
  shards = engine.Shards.of(_mesh(mesh_shape)) if mesh_shape else engine.Shards()

  def local(a, b, scale, bias, valid, ids, key_mask, ta, tb):
    del ta, tb
    rows, cols, _ = infonce.retrieval_layout(a, b, shards=shards, valid=valid, ids=ids, duplicates="ignore",
                                             key_mask=key_mask)
    return symmetric.lse_both(rows, cols, scale=scale, bias=bias, tile_size=tile, key_mode=key_mode, shards=shards)

  fn = _sharded(local, mesh_shape)
  args = lambda a, b, scale, bias: (a, b, scale, bias, x["valid"], x["ids"], x["key_mask"], x["ta"], x["tb"])
  out = jax.jit(lambda a, b, s, c: fn(*args(a, b, s, c)))(x["a"], x["b"], SCALE, BIAS)
  grads = jax.jit(jax.grad(lambda a, b, s, c: _objective(fn(*args(a, b, s, c)), x), argnums=(0, 1, 2, 3)))(
      x["a"], x["b"], SCALE, BIAS)
  return out, grads


SETUPS = [(None, "gather", 5), (((("data", 8),)), "gather", 7), ((("data", 8),), "local", 2),
          ((("data", 2), ("fsdp", 4)), "gather", 4)]


@pytest.mark.parametrize("mesh_shape,key_mode,tile", SETUPS)
def test_lse_both_matches_dense(mesh_shape, key_mode, tile):
  x = _inputs()
  out, grads = _run_lse_both(x, mesh_shape, key_mode, tile)
  n_blocks = 8 if key_mode == "local" else 1  # per-device keys: each shard's own 3 pairs only
  block = np.kron(np.eye(n_blocks, dtype=bool), np.ones((B // n_blocks,) * 2, bool))
  xd = {**x, "key_mask": x["key_mask"] | ~block}
  a, b = jnp.asarray(x["a"]), jnp.asarray(x["b"])
  want = _dense_lse_both(a, b, SCALE, BIAS, xd)
  want_grads = jax.grad(lambda a, b, s, c: _objective(_dense_lse_both(a, b, s, c, xd), x), argnums=(0, 1, 2, 3))(
      a, b, SCALE, BIAS)
  util.assert_close(out, want, f"lse_both values {mesh_shape} {key_mode}")
  util.assert_close(grads, want_grads, f"lse_both grads {mesh_shape} {key_mode}")
  assert np.isinf(np.asarray(out[0]["lse"])[[3, 17]]).all()  # invalid pairs: no negatives


def test_lse_both_has_no_ring_over_shards_and_no_id_positives():
  x = _inputs()
  rows, cols, _ = infonce.retrieval_layout(x["a"], x["b"], shards=engine.Shards(), ids=x["ids"], duplicates="positive")
  with pytest.raises(ValueError, match="designated positives only"):
    symmetric.lse_both(rows, cols)
  assert not symmetric.one_pass("ring", engine.Shards(("data",), 8))
  assert symmetric.one_pass("ring", engine.Shards()) and symmetric.one_pass("gather", engine.Shards(("data",), 8))
  with pytest.raises(ValueError, match="no ring over several shards"):
    symmetric.reduce_both({}, rows, cols, key_mode="ring", shards=engine.Shards(("data",), 8))


# ------------------------------------------------------------------------------------------------
# reduce_both: every kind of statistic, both directions, autodiff.


def _stats():
  return {"lse": engine.lse("pool"), "lse_neg": engine.lse("neg"), "soft": engine.soft("neg"),
          "pos_sum": engine.total("pos"), "sig": engine.total("neg", lambda t: jax.nn.softplus(t.s)),
          "neg_count": engine.count("neg"), "neg_max": engine.maximum("neg"), "pool_min": engine.minimum("pool")}


def _dense_direction(s, targets, pos, neg, ax):
  pool = pos | neg
  red = lambda v, m: jnp.sum(jnp.where(m, v, 0.0), axis=ax)
  q = jnp.where(neg, jax.nn.softmax(jnp.where(neg, targets, -jnp.inf), axis=ax), 0.0)
  q = jnp.where(jnp.any(neg, axis=ax, keepdims=True), q, 0.0)
  return {"lse": _dense_lse(s, pool, ax), "lse_neg": _dense_lse(s, neg, ax),
          "soft": {"lse": _dense_lse(targets, neg, ax), "s": jnp.sum(q * s, axis=ax),
                   "a": jnp.sum(q * jnp.where(neg, targets, 0.0), axis=ax)},
          "pos_sum": red(s, pos), "sig": red(jax.nn.softplus(s), neg),
          "neg_count": jnp.sum(neg, axis=ax).astype(jnp.float32),
          "neg_max": jnp.max(jnp.where(neg, s, -jnp.inf), axis=ax), "pool_min": jnp.min(jnp.where(pool, s, jnp.inf),
                                                                                        axis=ax)}


def _dense_both(a, b, scale, bias, x, key_block):
  s = scale * a @ b.T + bias
  pos, neg = _masks(x, positives_by_id=True)
  pos, neg = pos & key_block, neg & key_block  # per-device keys: a shard's own block only
  ta, tb = jnp.asarray(x["ta"]), jnp.asarray(x["tb"])
  return (_dense_direction(s, TARGET_SCALE * ta @ ta.T, pos, neg, 1),
          _dense_direction(s, TARGET_SCALE * tb @ tb.T, pos, neg, 0))


def _both_objective(out, x):
  total = 0.0
  for st, w in zip(out, (x["w_row"], x["w_col"])):
    for v in (st["lse"], st["lse_neg"], st["soft"]["s"], st["pos_sum"], st["sig"]):
      total = total + jnp.sum(w * _finite(v))
  return total


@pytest.mark.parametrize("mesh_shape,key_mode,tile", SETUPS)
def test_reduce_both_matches_dense(mesh_shape, key_mode, tile):
  x = _inputs(1)
  shards = engine.Shards.of(_mesh(mesh_shape)) if mesh_shape else engine.Shards()

  def local(a, b, scale, bias, valid, ids, key_mask, ta, tb):
    rows, cols, _ = infonce.retrieval_layout(a, b, shards=shards, valid=valid, ids=ids, duplicates="positive",
                                             key_mask=key_mask, query_targets=ta, key_targets=ta)
    return symmetric.reduce_both(_stats(), rows, cols, col_targets=(tb, tb), scale=scale, bias=bias,
                                 target_scale=TARGET_SCALE, tile_size=tile, key_mode=key_mode, shards=shards)

  fn = _sharded(local, mesh_shape)
  args = lambda a, b, s, c: (a, b, s, c, x["valid"], x["ids"], x["key_mask"], x["ta"], x["tb"])
  out = jax.jit(lambda a, b, s, c: fn(*args(a, b, s, c)))(x["a"], x["b"], SCALE, BIAS)
  grads = jax.jit(jax.grad(lambda a, b, s, c: _both_objective(fn(*args(a, b, s, c)), x), argnums=(0, 1, 2, 3)))(
      x["a"], x["b"], SCALE, BIAS)
  n_blocks = 8 if key_mode == "local" else 1
  block = jnp.asarray(np.kron(np.eye(n_blocks, dtype=bool), np.ones((B // n_blocks,) * 2, bool)))
  a, b = jnp.asarray(x["a"]), jnp.asarray(x["b"])
  ref = lambda a, b, s, c: _dense_both(a, b, s, c, x, block)
  want = ref(a, b, SCALE, BIAS)
  util.assert_close(out, want, f"reduce_both values {mesh_shape} {key_mode}")
  want_grads = jax.grad(lambda a, b, s, c: _both_objective(ref(a, b, s, c), x), argnums=(0, 1, 2, 3))(
      a, b, SCALE, BIAS)
  util.assert_close(grads, want_grads, f"reduce_both grads {mesh_shape} {key_mode}")
