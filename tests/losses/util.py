"""Helpers for the engine-based loss tests: meshes, one compiled value-and-grad per loss config, inputs.

Compilation dominates the test time, so every (loss, overrides, mesh) is built and jitted once per session
and reused across tests and hypothesis examples (same shapes => no recompilation).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_embed import losses
from big_embed.parallel.mesh import batch_sharding, make_mesh

TOL = dict(rtol=1e-5, atol=1e-5)

# (devices, key_mode, tile_size) with B = 24 pairs: tile 5 does not divide 24; on 8 devices the gathered
# keys (24) are cut in tiles of 7 and the ring blocks (3 keys) in tiles of 2.
SETUPS = [(1, "gather", 5), (8, "gather", 7), (8, "ring", 2)]
SHORT = [(1, "gather", 5), (8, "ring", 2)]


@functools.lru_cache(maxsize=None)
def mesh(n: int):
  return make_mesh({"data": -1}, devices=jax.devices()[:n])


@functools.lru_cache(maxsize=None)
def _compiled(name: str, n: int, overrides: tuple):
  spec = losses.get(name)
  cfg = losses.loss_config(name, **dict(overrides))
  spec.validate(cfg)
  loss_fn = spec.build(cfg, mesh(n))

  def f(emb, params, batch, step):
    return loss_fn(emb, batch, params, step)

  return cfg, spec, jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def run(name: str, n: int, emb: dict, batch: dict, params=None, step: int = 0, **overrides):
  """(loss, metrics, grads w.r.t. emb, grads w.r.t. params) of loss `name` on an n-device mesh."""
  cfg, spec, fn = _compiled(name, n, tuple(sorted(overrides.items())))
  if params is None:
    params = spec.init_params(cfg)
  (loss, metrics), (g_emb, g_params) = fn(emb, params, batch, jnp.int32(step))
  return loss, metrics, g_emb, g_params


def config(name: str, **overrides):
  return losses.loss_config(name, **overrides)


def assert_close(got, want, what=""):
  got, want = jax.device_get(got), jax.device_get(want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=what, **TOL),
               got, want)


def check(name, n, emb, batch, ref, params=None, step=0, metrics_ref=None, **overrides):
  """Loss value and gradients (embeddings and loss params) against `ref(emb, params) -> loss`, and the metrics
  named by `metrics_ref(emb, params) -> {name: value}` (e.g. the accuracy) against their reference values."""
  cfg = config(name, **overrides)
  if params is None:
    params = losses.get(name).init_params(cfg)
  loss, metrics, g_emb, g_params = run(name, n, emb, batch, params, step, **overrides)
  jemb = jax.tree.map(jnp.asarray, emb)
  want, (w_emb, w_params) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(jemb, params)
  what = f"{name} on {n} devices, {overrides}"
  assert_close(loss, want, what + ": loss")
  assert_close(g_emb, w_emb, what + ": d/d emb")
  assert_close(g_params, w_params, what + ": d/d params")
  for k, v in metrics.items():
    assert np.isfinite(np.asarray(v)).all(), (what, k, v)
  if metrics_ref is not None:
    for k, v in metrics_ref(jemb, params).items():
      assert_close(metrics[k], v, f"{what}: metric {k}")
  return loss, metrics


def check_init_scale(name, emb, batch, ref, **overrides):
  """`init_params` at temperature 0.125 gives κ = exp(t) = 8, and the loss at those params is `ref(emb)`, the
  loss's reference at κ = 8 (learnable temperature; `overrides` are other fields of the loss)."""
  fields = dict(temperature=0.125, learnable_temperature=True, **overrides)
  params = losses.get(name).init_params(config(name, **fields))
  np.testing.assert_allclose(np.exp(params["logit_scale"]), 8.0, rtol=1e-6)
  loss, _, _, _ = run(name, 1, emb, batch, tile_size=5, **fields)
  assert_close(loss, ref(jax.tree.map(jnp.asarray, emb)), f"{name} at its initial params")
  return params


def top1(logits, pos, neg):
  """NumPy top-1 accuracy: the share of rows with a positive whose best positive scores at least as high as every
  negative (a row without negatives counts as correct)."""
  logits = np.asarray(logits, np.float64)
  rows = np.asarray(pos).any(1)
  best_pos = np.where(pos, logits, -np.inf).max(1)
  best_neg = np.where(neg, logits, -np.inf).max(1)
  return float(np.mean((best_pos >= best_neg)[rows]))


def unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairs(seed: int, b: int = 24, d: int = 8, correlated: bool = True):
  """Two towers of unit vectors [b, d]; the second correlated with the first (so losses are moderate)."""
  rng = np.random.default_rng(seed)
  a = unit(rng, b, d)
  t = unit(rng, b, d)
  if correlated:
    t = a + 0.8 * t
    t = (t / np.linalg.norm(t, axis=-1, keepdims=True)).astype(np.float32)
  return rng, a, t


def masks(rng, b: int = 24, n_ids: int = 16):
  """A valid mask with two padded rows and item ids with duplicates."""
  valid = np.ones(b, bool)
  valid[rng.choice(b, 2, replace=False)] = False
  ids = rng.integers(0, n_ids, size=b).astype(np.int32)
  return valid, ids


def pair_masks(valid, ids, duplicates):
  """NumPy (pos, neg) [B, B] masks of the two-tower pair layout (row i's positive is column i)."""
  b = len(valid)
  eye = np.eye(b, dtype=bool)
  same = (ids[:, None] == ids[None, :]) if ids is not None else eye
  live = valid[:, None] & valid[None, :]
  pos = (eye | (same if duplicates == "positive" else False)) & live
  ignore = same & ~eye if duplicates == "ignore" else np.zeros_like(eye)
  neg = live & ~pos & ~ignore
  return pos, neg


def put(mesh_, tree):
  """Shards every leaf's leading dim over the mesh's batch axes."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh_, x.ndim)), tree)


def fd_grad(f, x, h=1e-6):
  """Central finite differences of a float64 NumPy function of one array."""
  x = np.float64(x)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g
