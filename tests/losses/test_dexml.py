"""DEXML (decoupled softmax, multi-label softmax, soft top-k) over the engine vs naive full matrices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed.losses import dexml
from tests.losses import util

B, L, D = 24, 32, 8
SCALE = 20.0  # temperature 0.05


def _scale(params):
  """The logit scale: exp(t) when the temperature is learnable, else the fixed 1/0.05."""
  return jnp.exp(params["logit_scale"]) if "logit_scale" in params else SCALE


def inputs(seed):
  rng = np.random.default_rng(seed)
  emb = {"query": util.unit(rng, B, D), "label": util.unit(rng, L, D)}
  label_ids = rng.permutation(100)[:L].astype(np.int32)
  # 1-3 sampled positives (from the pool, sometimes an id outside it), 0-2 more non-sampled positives.
  pick = lambda n: rng.choice(label_ids, n, replace=False)
  pos = np.full((B, 3), -1, np.int32)
  allp = np.full((B, 5), -1, np.int32)
  for i in range(B):
    ids = pick(5)
    n_s, n_all = rng.integers(1, 4), rng.integers(0, 3)
    pos[i, :n_s] = ids[:n_s]
    allp[i, :n_s + n_all] = ids[:n_s + n_all]
  pos[5, 0] = 999  # a positive that is not in the pool
  label_valid = np.ones(L, bool)
  label_valid[[3, 20]] = False
  valid = np.ones(B, bool)
  valid[7] = False
  batch = {"positive_ids": pos, "all_positive_ids": allp, "label_ids": label_ids, "label_valid": label_valid,
           "valid": valid}
  return emb, batch


def _masks(batch):
  """pos [B, L] (sampled positives), allpos [B, L], and valid labels [L]; NumPy."""
  lid = batch["label_ids"]
  pos = (lid[None, :, None] == batch["positive_ids"][:, None, :]).any(-1)
  allp = pos | (lid[None, :, None] == batch["all_positive_ids"][:, None, :]).any(-1)
  live = batch["label_valid"][None, :] & batch["valid"][:, None]
  return pos & live, allp & live, live


def naive_softmax(batch):
  pos, _, live = _masks(batch)
  rows = pos.any(1)

  def ref(emb, params):
    l = _scale(params) * emb["query"] @ emb["label"].T
    lse = jax.nn.logsumexp(jnp.where(live, l, -jnp.inf)[rows], axis=1)
    per_row = pos[rows].sum(1) * lse - jnp.sum(jnp.where(pos, l, 0.0)[rows], axis=1)
    return jnp.mean(per_row)

  return ref


def naive_decoupled(batch):
  pos, allp, live = _masks(batch)
  negs = live & ~allp
  rows = pos.any(1)

  def ref(emb, params):
    l = (_scale(params) * emb["query"] @ emb["label"].T)[rows]  # [B', L]
    p, n = pos[rows], negs[rows]
    neg_exp = jnp.sum(jnp.where(n, jnp.exp(l), 0.0), axis=1, keepdims=True)  # Σ_{l∉P*} e^ℓ
    terms = -(l - jnp.log(jnp.exp(l) + neg_exp))  # −log(e^ℓp / (e^ℓp + Σ_neg e^ℓ)) for every column
    return jnp.mean(jnp.sum(jnp.where(p, terms, 0.0), axis=1) / p.sum(1))

  return ref


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _threshold(l, pool, k, alpha):
  """Per row t with Σ_pool σ(α(l + t)) = k (64 bisection halvings), implicit-function gradient below.

  l: [R, L], pool: [R, L] bool, k: [R].
  """
  lo = -jnp.max(jnp.where(pool, l, -jnp.inf), axis=1) - 10 / alpha
  hi = -jnp.min(jnp.where(pool, l, jnp.inf), axis=1) + 10 / alpha

  def halve(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    below = jnp.sum(jnp.where(pool, jax.nn.sigmoid(alpha * (l + mid[:, None])), 0.0), axis=1) < k
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, 64, halve, (lo, hi))
  return 0.5 * (lo + hi)


def _threshold_fwd(l, pool, k, alpha):
  t = _threshold(l, pool, k, alpha)
  sig = jax.nn.sigmoid(alpha * (l + t[:, None]))
  v = jnp.where(pool, alpha * sig * (1 - sig), 0.0)
  return t, v


def _threshold_bwd(alpha, v, g):
  del alpha
  # ∂t_i/∂l_ij = −v_ij / Σ_j v_ij; the pool mask and k get no gradient.
  return -g[:, None] * v / jnp.sum(v, axis=1, keepdims=True), None, jnp.zeros_like(g)


_threshold.defvjp(_threshold_fwd, _threshold_bwd)


def naive_topk(batch, k=5, alpha=2.0, k_mode="fixed"):
  pos, allp, live = _masks(batch)
  pool = live & (~allp | pos)
  ks = np.full(B, float(k)) if k_mode == "fixed" else (batch["all_positive_ids"] >= 0).sum(1).astype(float)
  rows = pos.any(1) & (ks > 0) & (pool.sum(1) > ks)

  def ref(emb, params):
    l = (_scale(params) * emb["query"] @ emb["label"].T)[rows]
    t = _threshold(l, pool[rows], jnp.asarray(ks[rows], jnp.float32), alpha)
    log_pi = jax.nn.log_sigmoid(alpha * (l + t[:, None]))  # soft top-k membership
    p = pos[rows]
    return jnp.mean(-jnp.sum(jnp.where(p, log_pi, 0.0), axis=1) / p.sum(1))

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_decoupled_matches_naive(n, key_mode, tile):
  emb, batch = inputs(70)
  util.check("dexml", n, emb, batch, naive_decoupled(batch), tile_size=tile, key_mode=key_mode)


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_softmax_baseline_matches_naive(n, key_mode, tile):
  emb, batch = inputs(71)
  util.check("dexml", n, emb, batch, naive_softmax(batch), tile_size=tile, key_mode=key_mode, mode="softmax")


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_topk_matches_naive_implicit_gradient(n, key_mode, tile):
  emb, batch = inputs(72)
  util.check("dexml", n, emb, batch, naive_topk(batch), tile_size=tile, key_mode=key_mode, mode="topk")


def test_topk_num_pos_learnable_temperature():
  """Also the gradient w.r.t. the logit scale through the threshold's Newton step."""
  emb, batch = inputs(73)
  params = {"logit_scale": jnp.float32(np.log(15.0))}
  util.check("dexml", 8, emb, batch, naive_topk(batch, k_mode="num_pos"), params=params, tile_size=7,
             mode="topk", topk_k_mode="num_pos", learnable_temperature=True)


def test_decoupled_ignores_non_sampled_positives():
  """Making a non-sampled positive's score huge changes softmax (it is a negative there), not decoupled."""
  emb, batch = inputs(74)
  i = next(i for i in range(B) if batch["valid"][i] and (batch["all_positive_ids"][i] >= 0).sum() >
           (batch["positive_ids"][i] >= 0).sum())
  extra_id = batch["all_positive_ids"][i][(batch["positive_ids"][i] >= 0).sum()]
  col = int(np.flatnonzero(batch["label_ids"] == extra_id)[0])
  moved = {**emb, "label": emb["label"].copy()}
  moved["label"][col] = emb["query"][i]
  dec = [float(util.run("dexml", 1, e, batch, tile_size=5)[0]) for e in (emb, moved)]
  soft = [float(util.run("dexml", 1, e, batch, tile_size=5, mode="softmax")[0]) for e in (emb, moved)]
  assert abs(soft[1] - soft[0]) > 1e-3
  # Decoupled: only other rows (for which that label is a negative) can change.
  want = naive_decoupled(batch)(jax.tree.map(jnp.asarray, moved), {})
  np.testing.assert_allclose(dec[1], want, **util.TOL)


def test_sample_positives():
  rng = jax.random.PRNGKey(0)
  ids = jnp.array([[4, 7, 9, -1], [3, -1, -1, -1], [5, 6, 8, 2]])
  rel = jnp.array([[1.0, 0.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  got = np.asarray(dexml.sample_positives(rng, ids, rel, m=2))
  assert set(got[0]) == {4, 9}  # relevance 0 is never drawn
  assert list(got[1]) == [3, -1]  # fewer positives than m: padded
  assert len(set(got[2])) == 2 and set(got[2]) <= {5, 6, 8, 2}
