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


def _weights(batch):
  """[B, L]: each sampled positive's weight (batch["positive_weights"], aligned with positive_ids; default 1)."""
  w = batch.get("positive_weights", np.ones(batch["positive_ids"].shape, np.float32))
  hit = batch["label_ids"][None, :, None] == batch["positive_ids"][:, None, :]  # [B, L, P]
  return np.where(hit, w[:, None, :], 0.0).sum(-1).astype(np.float32)


def _logits(emb, params):
  return _scale(params) * emb["query"] @ emb["label"].T


def naive_accuracy(batch, mode="decoupled", rows=None):
  """Top-1 accuracy over the rows that take part: the best pool label is a sampled positive; for softmax the
  non-sampled positives are negatives, otherwise they are out of the pool."""
  pos, allp, live = _masks(batch)
  neg = live & ~pos if mode == "softmax" else live & ~allp
  rows = pos.any(1) if rows is None else rows
  return lambda emb, params: {"accuracy": util.top1(np.asarray(_logits(emb, params))[rows], pos[rows], neg[rows])}


def naive_softmax(batch):
  pos, _, live = _masks(batch)
  w = _weights(batch)
  rows = pos.any(1)

  def ref(emb, params):
    l = _logits(emb, params)
    lse = jax.nn.logsumexp(jnp.where(live, l, -jnp.inf)[rows], axis=1, keepdims=True)  # [B', 1]
    return jnp.mean(jnp.sum(jnp.where(pos[rows], w[rows] * (lse - l[rows]), 0.0), axis=1))

  return ref


def naive_decoupled(batch):
  pos, allp, live = _masks(batch)
  w = _weights(batch)
  negs = live & ~allp
  rows = pos.any(1)

  def ref(emb, params):
    l = _logits(emb, params)[rows]  # [B', L]
    p, n = pos[rows], negs[rows]
    neg_exp = jnp.sum(jnp.where(n, jnp.exp(l), 0.0), axis=1, keepdims=True)  # Σ_{l∉P*} e^ℓ
    terms = -(l - jnp.log(jnp.exp(l) + neg_exp))  # −log(e^ℓp / (e^ℓp + Σ_neg e^ℓ)) for every column
    return jnp.mean(jnp.sum(jnp.where(p, w[rows] * terms, 0.0), axis=1) / p.sum(1))

  return ref


def naive_bce(batch):
  """mean over rows of the mean over the row's pool (valid labels, non-sampled positives left out) of
  w·(softplus(ℓ) − y·ℓ), y = 1 on sampled positives (w = their weight) and 0 elsewhere (w = 1)."""
  pos, allp, live = _masks(batch)
  y = pos.astype(np.float32)
  w = np.where(pos, _weights(batch), 1.0)
  pool = live & (~allp | pos)
  rows = pos.any(1)

  def ref(emb, params):
    l = _logits(emb, params)
    terms = jnp.where(pool, w * (jax.nn.softplus(l) - y * l), 0.0)[rows]
    return jnp.mean(jnp.sum(terms, axis=1) / pool[rows].sum(1))

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


def _topk_rows(batch, k, k_mode):
  """(k per row, pool [B, L], rows that take part: a positive and 0 < k < |pool|)."""
  pos, allp, live = _masks(batch)
  pool = live & (~allp | pos)
  ks = {"fixed": lambda: np.full(B, float(k)), "per_row": lambda: np.asarray(batch.get("topk_k"), float),
        "num_pos": lambda: (batch["all_positive_ids"] >= 0).sum(1).astype(float)}[k_mode]()
  return ks, pool, pos.any(1) & (ks > 0) & (pool.sum(1) > ks)


def naive_topk(batch, k=5, alpha=2.0, k_mode="fixed"):
  pos, _, _ = _masks(batch)
  w = _weights(batch)
  ks, pool, rows = _topk_rows(batch, k, k_mode)

  def ref(emb, params):
    l = _logits(emb, params)[rows]
    t = _threshold(l, pool[rows], jnp.asarray(ks[rows], jnp.float32), alpha)
    log_pi = jax.nn.log_sigmoid(alpha * (l + t[:, None]))  # soft top-k membership
    p = pos[rows]
    return jnp.mean(-jnp.sum(jnp.where(p, w[rows] * log_pi, 0.0), axis=1) / p.sum(1))

  return ref


def np_topk(batch, q, labels, scale, k=5, alpha=2.0):
  """Float64 NumPy soft top-k: value and gradients w.r.t. (queries, labels), row by row.

  The threshold by 200 bisection halvings of Σσ(α(ℓ + t)) = k; the gradient by the implicit-function formula
  ∂ log π_p/∂ℓ_l = α σ(−x_p) (δ_pl − v_l/Σv), v = α σ(x)σ(−x), x = α(ℓ + t) (ALGORITHMS.md §2.4).
  """
  pos, _, _ = _masks(batch)
  ks, pool, rows = _topk_rows(batch, k, "fixed")
  q, labels = np.float64(q), np.float64(labels)
  l = scale * q @ labels.T  # [B, L]
  sig = lambda x: 0.5 * (1.0 + np.tanh(0.5 * x))
  total, g = 0.0, np.zeros_like(l)
  for i in np.flatnonzero(rows):
    m = pool[i]
    lo, hi = -l[i, m].max() - 10 / alpha, -l[i, m].min() + 10 / alpha
    for _ in range(200):
      mid = 0.5 * (lo + hi)
      lo, hi = (mid, hi) if sig(alpha * (l[i, m] + mid)).sum() < ks[i] else (lo, mid)
    x = alpha * (l[i] + 0.5 * (lo + hi))
    v = np.where(m, alpha * sig(x) * sig(-x), 0.0)
    p = np.flatnonzero(pos[i])
    total += np.logaddexp(0.0, -x[p]).sum() / len(p)
    for j in p:  # −log π_j = softplus(−x_j)
      g[i] -= alpha * sig(-x[j]) * (np.eye(l.shape[1])[j] - v / v.sum()) / len(p)
  n = rows.sum()
  return total / n, (scale * g @ labels / n, scale * g.T @ q / n)


@pytest.mark.parametrize("mode,reference,seed", [("decoupled", naive_decoupled, 70), ("softmax", naive_softmax, 71),
                                                 ("bce", naive_bce, 75)])
@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_modes_match_naive(mode, reference, seed, n, key_mode, tile):
  emb, batch = inputs(seed)
  _, got = util.check("dexml", n, emb, batch, reference(batch), tile_size=tile, key_mode=key_mode, mode=mode,
                      metrics_ref=naive_accuracy(batch, mode))
  assert 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("mode,reference", [("decoupled", naive_decoupled), ("softmax", naive_softmax),
                                            ("bce", naive_bce), ("topk", naive_topk)])
@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_positive_weights(mode, reference, n, key_mode, tile):
  """DEXML's `loss_weighted`: each positive's term times its relevance (batch["positive_weights"])."""
  emb, batch = inputs(76)
  batch["positive_weights"] = np.random.default_rng(76).uniform(0.2, 3.0, size=batch["positive_ids"].shape)
  util.check("dexml", n, emb, batch, reference(batch), tile_size=tile, key_mode=key_mode, mode=mode)


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_topk_matches_naive_implicit_gradient(n, key_mode, tile):
  emb, batch = inputs(72)
  rows = _topk_rows(batch, 5, "fixed")[2]
  util.check("dexml", n, emb, batch, naive_topk(batch), tile_size=tile, key_mode=key_mode, mode="topk",
             metrics_ref=naive_accuracy(batch, "topk", rows))


@pytest.mark.parametrize("alpha,tol", [(4.0, 1e-5), (10.0, 2e-4)])
def test_topk_saturating_alpha_matches_float64(alpha, tol):
  """α·ℓ up to ±80 (α = 4) and ±200 (α = 10): the sigmoids saturate and a row's threshold can sit in a gap where
  Σσ' is ~1e-7 (α = 4) or ~1e-10 (α = 10). Value and implicit gradient match a float64 reference to 1e-5 at
  α = 4; at α = 10 the gap rows' gradient split depends on x_a + x_b ≈ 0 to within float32 rounding of the
  logits themselves (~1e-6 · α), so the bound there is 2e-4 (the bisection point's gradient was off by ~0.4)."""
  emb, batch = inputs(77)
  loss, _, g_emb, _ = util.run("dexml", 1, emb, batch, tile_size=5, mode="topk", topk_alpha=alpha)
  want, (g_query, g_label) = np_topk(batch, emb["query"], emb["label"], SCALE, alpha=alpha)
  close = lambda got, want, what: np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=what)
  close(loss, want, f"alpha={alpha}: loss")
  close(g_emb["query"], g_query, f"alpha={alpha}: d/d query")
  close(g_emb["label"], g_label, f"alpha={alpha}: d/d label")


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_topk_per_row_k(n, key_mode, tile):
  """topk_k_mode="per_row": k_i from batch["topk_k"]; rows with k = 0 or k >= |pool| are dropped."""
  emb, batch = inputs(78)
  ks = np.random.default_rng(78).integers(1, 8, size=B).astype(np.float32)
  ks[2], ks[9] = 0, 40  # out of (0, |pool|)
  batch["topk_k"] = ks
  rows = _topk_rows(batch, None, "per_row")[2]
  _, got = util.check("dexml", n, emb, batch, naive_topk(batch, k_mode="per_row"), tile_size=tile,
                      key_mode=key_mode, mode="topk", topk_k_mode="per_row",
                      metrics_ref=naive_accuracy(batch, "topk", rows))
  assert float(got["rows"]) == rows.sum() < B - 2


def test_topk_num_pos_learnable_temperature():
  """Also the gradient w.r.t. the logit scale through the threshold's Newton step."""
  emb, batch = inputs(73)
  params = {"logit_scale": jnp.float32(np.log(15.0))}
  util.check("dexml", 8, emb, batch, naive_topk(batch, k_mode="num_pos"), params=params, tile_size=7,
             mode="topk", topk_k_mode="num_pos", learnable_temperature=True)


def test_learnable_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  emb, batch = inputs(79)
  at_8 = {"logit_scale": jnp.log(jnp.float32(8.0))}
  util.check_init_scale("dexml", emb, batch, lambda emb: naive_decoupled(batch)(emb, at_8))


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
