"""The similarity engine: statistics vs naive full matrices (hypothesis over shapes and masks), the InfoNCE
function `infonce.info_nce`, fully masked rows, input errors, and the memory of the tiled forward+backward
(compile only)."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed.losses import engine
from big_embed.losses import infonce
from tests.losses import util

SCALE, BIAS, TSCALE = 3.0, -0.5, 2.0


def _stats():
  return {"lse": engine.lse("pool"), "lse_neg": engine.lse("neg"), "soft": engine.soft("pool"),
          "soft_neg": engine.soft("neg"), "pos": engine.total("pos"), "pos_n": engine.count("pos"),
          "neg_n": engine.count("neg"), "max": engine.maximum("pool"), "min": engine.minimum("neg"),
          "sp": engine.total("neg", lambda t: jax.nn.softplus(t.s + t.aux["o"][:, None])),
          "wpos": engine.total("pos", lambda t: t.pos_weight * t.s)}


def _scalar(out):
  """A differentiable scalar of every statistic (empty rows contribute 0)."""
  f = lambda x: jnp.sum(jnp.where(jnp.isfinite(x), x, 0.0))
  return (f(out["lse"]) + 0.5 * f(out["lse_neg"]) + f(out["soft"]["s"]) + 0.3 * f(out["soft_neg"]["s"])
          + 0.7 * f(out["pos"]) + 0.2 * f(out["sp"]) + 0.4 * f(out["wpos"]))


@functools.lru_cache(maxsize=None)
def _engine_fn(tile, with_extra):
  def f(q, k, qa, ka, ek, eka, masks):
    rows = engine.Rows(q=q, valid=masks["row_valid"], pos_index=masks["pos_index"], ids=masks["ids"],
                       ignore_ids=masks["ignore_ids"], neg_threshold=masks["thr"], qa=qa, aux={"o": masks["o"]},
                       key_mask=masks["key_mask"], pos_weights=masks["pos_w"])
    keys = engine.Keys(k=k, index=masks["key_index"], valid=masks["key_valid"], ids=masks["key_ids"], ka=ka)
    extra = None
    if with_extra:
      extra = engine.Extra(k=ek, valid=masks["extra_valid"], pos=masks["extra_pos"], ka=eka)
    out = engine.reduce_rows(_stats(), rows, keys, extra, scale=SCALE, bias=BIAS, target_scale=TSCALE,
                             tile_size=tile)
    return _scalar(out), out
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 4), has_aux=True))


@functools.partial(jax.jit, static_argnums=7)
def _naive(q, k, qa, ka, ek, eka, m, with_extra):
  """Full [R, N (+H)] matrices with the masks spelled out."""
  dot = q @ k.T
  a = TSCALE * qa @ ka.T
  pos = ((m["key_index"][None, :] == m["pos_index"][:, None]) & (m["pos_index"][:, None] >= 0)) | \
        ((m["key_ids"][None, :, None] == m["ids"][:, None, :]) & (m["ids"][:, None, :] >= 0)).any(-1)
  ign = ((m["key_ids"][None, :, None] == m["ignore_ids"][:, None, :]) & (m["ignore_ids"][:, None, :] >= 0)).any(-1)
  ign = ign | (m["key_mask"][:, m["key_index"]] & (m["key_index"] >= 0))  # by global column index; -1: none
  designated = (m["key_index"][None, :] == m["pos_index"][:, None]) & (m["pos_index"][:, None] >= 0)
  hit = (m["key_ids"][None, :, None] == m["ids"][:, None, :]) & (m["ids"][:, None, :] >= 0)  # [R, N, P]
  weight = jnp.where(designated, 1.0, jnp.sum(jnp.where(hit, m["pos_w"][:, None, :], 0.0), -1))
  live = m["row_valid"][:, None] & m["key_valid"][None, :]
  if with_extra:
    dot = jnp.concatenate([dot, jnp.einsum("rd,rhd->rh", q, ek)], 1)
    a = jnp.concatenate([a, TSCALE * jnp.einsum("rd,rhd->rh", qa, eka)], 1)
    pos = jnp.concatenate([pos, m["extra_pos"]], 1)
    ign = jnp.concatenate([ign, jnp.zeros_like(m["extra_pos"])], 1)
    live = jnp.concatenate([live, m["row_valid"][:, None] & m["extra_valid"]], 1)
    weight = jnp.concatenate([weight, jnp.ones(m["extra_pos"].shape)], 1)
  s = SCALE * dot + BIAS
  pos = pos & live
  neg = live & ~pos & ~ign & (jax.lax.stop_gradient(dot) < m["thr"][:, None])
  pool = pos | neg

  def lse(mask, x):
    return jnp.where(mask.any(1), jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=1, where=mask.any(1)[:, None]),
                     -jnp.inf)

  def soft(mask):
    w = jax.nn.softmax(jnp.where(mask, a, -jnp.inf), axis=1, where=mask.any(1)[:, None])
    w = jnp.where(mask, w, 0.0)
    return {"lse": lse(mask, a), "s": jnp.sum(w * jnp.where(mask, s, 0.0), 1),
            "a": jnp.sum(w * jnp.where(mask, a, 0.0), 1)}

  out = {"lse": lse(pool, s), "lse_neg": lse(neg, s), "soft": soft(pool), "soft_neg": soft(neg),
         "pos": jnp.sum(jnp.where(pos, s, 0.0), 1), "pos_n": pos.sum(1).astype(jnp.float32),
         "neg_n": neg.sum(1).astype(jnp.float32), "max": jnp.max(jnp.where(pool, s, -jnp.inf), 1),
         "min": jnp.min(jnp.where(neg, s, jnp.inf), 1),
         "sp": jnp.sum(jnp.where(neg, jax.nn.softplus(s + m["o"][:, None]), 0.0), 1),
         "wpos": jnp.sum(jnp.where(pos, weight * s, 0.0), 1)}
  return _scalar(out), out


@functools.partial(jax.jit, static_argnums=7)
def _naive_grad(q, k, qa, ka, ek, eka, m, with_extra):
  return jax.value_and_grad(lambda q, k, ek: _naive(q, k, qa, ka, ek, eka, m, with_extra), argnums=(0, 1, 2),
                            has_aux=True)(q, k, ek)


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(r=st.sampled_from([1, 4]), n_tile=st.sampled_from([(1, 4), (6, 4), (11, 4), (11, 16), (6, 1)]),
                  h=st.sampled_from([0, 2]), seed=st.integers(0, 2**16), p_valid=st.sampled_from([0.0, 0.7, 1.0]))
def test_statistics_match_naive(r, n_tile, h, seed, p_valid):
  """Shapes (tiles that do / do not divide N, one tile, tile > N) and random masks of every kind."""
  n, tile = n_tile
  rng = np.random.default_rng(seed)
  d, da = 3, 2
  q, k = rng.normal(size=(r, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
  qa, ka = rng.normal(size=(r, da)).astype(np.float32), rng.normal(size=(n, da)).astype(np.float32)
  ek = rng.normal(size=(r, max(h, 1), d)).astype(np.float32)
  eka = rng.normal(size=(r, max(h, 1), da)).astype(np.float32)
  m = {"row_valid": rng.random(r) < max(p_valid, 0.5), "pos_index": rng.integers(-1, n, size=r).astype(np.int32),
       "ids": rng.integers(-1, 4, size=(r, 2)).astype(np.int32),
       "ignore_ids": rng.integers(-1, 4, size=(r, 1)).astype(np.int32),
       "thr": rng.normal(size=r).astype(np.float32) + 1.0, "o": rng.normal(size=r).astype(np.float32),
       "key_index": np.where(np.arange(n) == 0, -1, rng.permutation(n)).astype(np.int32),
       "key_valid": rng.random(n) < p_valid,
       "key_ids": rng.integers(-1, 4, size=n).astype(np.int32),
       "extra_valid": rng.random((r, max(h, 1))) < 0.7, "extra_pos": rng.random((r, max(h, 1))) < 0.3,
       "key_mask": rng.random((r, n)) < 0.2, "pos_w": rng.uniform(0.5, 2.0, size=(r, 2)).astype(np.float32)}
  args = (q, k, qa, ka, ek, eka, m)
  (val, out), grads = _engine_fn(tile, h > 0)(*args)
  (want, want_out), want_grads = _naive_grad(*args, h > 0)
  util.assert_close(out, want_out, "statistics")
  util.assert_close(val, want, "scalar")
  util.assert_close(grads, want_grads, "gradients")
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


# ------------------------------------------------------------------------------------------------
# infonce.info_nce, the InfoNCE function on global arrays (Piccolo2's retrieval branch).


def naive_info_nce(q, k, n, ids, scale, blocks=1):
  """Row i vs [all keys ; all hard negatives] (or only its own block's), duplicates of its id ignored."""
  b = q.shape[0]
  m = n.shape[0]
  logits = scale * jnp.concatenate([q @ k.T, q @ n.T], axis=1)  # [B, B + M]
  eye = np.eye(b, dtype=bool)
  ignore = (ids[:, None] == ids[None, :]) & ~eye
  rb, nb = np.arange(b) // (b // blocks), np.arange(m) // (m // blocks)
  pool = np.concatenate([~ignore & (rb[:, None] == rb[None, :]), rb[:, None] == nb[None, :]], axis=1)
  lse = jax.nn.logsumexp(jnp.where(pool, logits, -jnp.inf), axis=1)
  return jnp.mean(lse - jnp.diagonal(logits[:, :b]))


def _info_nce_inputs(seed=80, b=16, m=8, d=6):
  rng = np.random.default_rng(seed)
  q, k, n = util.unit(rng, b, d), util.unit(rng, b, d), util.unit(rng, m, d)
  ids = rng.integers(0, 10, size=b).astype(np.int32)
  return q, k, n, ids


@pytest.mark.parametrize("n_dev,key_mode,blocks", [(None, "local", 1), (8, "local", 8), (8, "gather", 1)])
def test_info_nce_function(n_dev, key_mode, blocks):
  q, k, n, ids = _info_nce_inputs()
  mesh = None if n_dev is None else util.mesh(n_dev)

  @jax.jit
  @functools.partial(jax.value_and_grad, argnums=(0, 1, 2, 3), has_aux=True)
  def f(q, k, n, temperature):
    return infonce.info_nce(q, k, n, ids, temperature=temperature, mesh=mesh, key_mode=key_mode, tile_size=3)

  (loss, metrics), grads = f(q, k, n, jnp.float32(0.1))
  want, want_grads = jax.value_and_grad(lambda q, k, n, t: naive_info_nce(q, k, n, ids, 1 / t, blocks),
                                        argnums=(0, 1, 2, 3))(q, k, n, jnp.float32(0.1))
  util.assert_close(loss, want)
  util.assert_close(grads, want_grads)
  assert float(metrics["rows"]) == 16


def test_info_nce_normalizes_and_checks_arguments():
  q, k, n, ids = _info_nce_inputs()
  loss, _ = infonce.info_nce(3 * q, 2 * k, 5 * n, ids, scale=10.0, normalize=True, tile_size=4)
  util.assert_close(loss, naive_info_nce(q, k, n, ids, 10.0))
  with pytest.raises(ValueError, match="exactly one of scale, temperature"):
    infonce.info_nce(q, k)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    infonce.info_nce(q, k, temperature=0.0)
  with pytest.raises(ValueError, match="keys must have the queries' shape"):
    infonce.info_nce(q, k[:5], scale=1.0)
  with pytest.raises(ValueError, match=r"ids must be \[16\]"):
    infonce.info_nce(q, k, ids=ids[:3], scale=1.0)
  with pytest.raises(ValueError, match="shared negatives must be"):
    infonce.info_nce(q, k, n[:, :2], scale=1.0)
  with pytest.raises(ValueError, match="divisible by the 8 batch shards"):
    infonce.info_nce(q[:12], k[:12], scale=1.0, mesh=util.mesh(8))
  with pytest.raises(ValueError, match="key_mode must be one of"):
    infonce.info_nce(q, k, scale=1.0, key_mode="all")
  with pytest.raises(ValueError, match="tile_size must be a positive int"):
    infonce.info_nce(q, k, scale=1.0, tile_size=0)


# ------------------------------------------------------------------------------------------------
# Fully masked rows and extreme logits: documented safe behaviour, never NaN.


def test_fully_masked_rows_are_safe():
  q, k, n, ids = _info_nce_inputs()
  f = jax.jit(jax.value_and_grad(
      lambda q, k, valid: infonce.info_nce(q, k, scale=50.0, valid=valid, tile_size=5)[0], argnums=(0, 1)))
  # No valid row at all: loss 0, zero gradients.
  loss, grads = f(q, k, np.zeros(16, bool))
  assert float(loss) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)
  # One valid row: it has no negatives (every other column is padding); its loss is log(1) = 0.
  loss, grads = f(q, k, np.eye(16, dtype=bool)[3])
  assert abs(float(loss)) < 1e-6 and all(np.isfinite(np.asarray(g)).all() for g in grads)
  # Rows whose designated positive is ignored by every column (all duplicates, ignored): no NaN.
  loss, metrics = infonce.info_nce(q, k, ids=np.zeros(16, np.int32), scale=50.0, tile_size=5)
  assert float(metrics["rows"]) == 16 and abs(float(loss)) < 1e-6


def test_extreme_logits_are_finite():
  q, k, n, ids = _info_nce_inputs()
  f = jax.jit(jax.value_and_grad(lambda q, k: infonce.info_nce(q, k, n, scale=1e4, tile_size=5)[0],
                                 argnums=(0, 1)))
  loss, grads = f(q * 30.0, k * 30.0)
  assert np.isfinite(float(loss))
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_row_without_positive_is_dropped_not_nan():
  rng = np.random.default_rng(5)
  q, k = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
  rows = engine.Rows(q=q, valid=np.ones(4, bool), pos_index=np.array([0, -1, 2, 7], np.int32))
  keys = engine.Keys(k=k, index=np.arange(6, dtype=np.int32), valid=np.ones(6, bool))

  def loss(q, k):
    st = engine.reduce_rows(infonce.contrastive_stats(), rows._replace(q=q), keys._replace(k=k), tile_size=4)
    nll, ok = infonce.contrastive_nll(st)
    return engine.global_mean(nll, ok, engine.Shards())

  val, grads = jax.value_and_grad(loss, argnums=(0, 1))(q, k)
  logits = q @ k.T
  want = np.mean([jax.nn.logsumexp(logits[i]) - logits[i, i] for i in (0, 2)])
  np.testing.assert_allclose(val, want, **util.TOL)
  assert np.all(np.asarray(grads[0])[[1, 3]] == 0.0)


def test_engine_input_errors():
  q = np.zeros((4, 3), np.float32)
  keys = engine.Keys(k=np.zeros((5, 3), np.float32), index=np.arange(5, dtype=np.int32), valid=np.ones(5, bool))
  stats = {"lse": engine.lse()}
  with pytest.raises(ValueError, match=r"keys.k must be \[5, 3\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool)), keys._replace(k=np.zeros((5, 2))))
  with pytest.raises(ValueError, match=r"rows.valid must be \[4\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(3, bool)), keys)
  with pytest.raises(ValueError, match="need key ids"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool), ids=np.zeros((4, 1), np.int32)), keys)
  with pytest.raises(ValueError, match=r"keys.valid must be \[5\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool)), keys._replace(valid=np.ones(4, bool)))
  with pytest.raises(ValueError, match=r"rows.key_mask must be \[4, \?\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool), key_mask=np.ones(4, bool)), keys)
  with pytest.raises(ValueError, match=r"rows.pos_weights \(as rows.ids\) must be \[4, 1\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool), ids=np.zeros((4, 1), np.int32),
                                          pos_weights=np.ones((4, 2))), keys._replace(ids=np.arange(5)))
  with pytest.raises(ValueError, match=r"extra.k must be \[4, \?, 3\]"):
    engine.reduce_rows(stats, engine.Rows(q=q, valid=np.ones(4, bool)), keys,
                       engine.Extra(k=np.zeros((4, 2, 2)), valid=np.ones((4, 2), bool)))
  with pytest.raises(ValueError, match="mask must be 'pos', 'neg' or 'pool'"):
    engine.lse("all")


# ------------------------------------------------------------------------------------------------
# Memory: compiled temp buffers of the tiled InfoNCE forward+backward vs the naive full matrix.


def test_tiled_memory_below_one_eighth_of_naive():
  n, d = 16384, 256
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32)

  def tiled(q, k):
    return infonce.info_nce(q, k, scale=20.0, tile_size=256)[0]

  def naive(q, k):
    logits = 20.0 * q @ k.T  # [N, N]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

  temp = {}
  for name, f in (("tiled", tiled), ("naive", naive)):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(spec, spec).compile()
    temp[name] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["naive"] >= n * n * 4  # the naive version really holds an N×N matrix
  assert temp["tiled"] < temp["naive"] / 8, temp
