"""CoSENT against an explicit double loop, on 1 device and sharded over 8 fake devices."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.errors import ConfigError
from big_embed.losses import pairwise
from tests.losses import util

TOL = dict(rtol=1e-5, atol=1e-5)


def naive_cosent(a, b, y, scale=20.0, weight=1.0):
  """w · log(1 + Σ_{y_i < y_j} exp(λ(c_i − c_j))) by an explicit double loop (a, b jnp [B, D]; y NumPy [B])."""
  n = len(y)
  c = [jnp.dot(a[i], b[i]) / (jnp.sqrt(jnp.dot(a[i], a[i])) * jnp.sqrt(jnp.dot(b[i], b[i]))) for i in range(n)]
  total = jnp.float32(1.0)
  for i in range(n):
    for j in range(n):
      if y[i] < y[j]:
        total = total + jnp.exp(scale * (c[i] - c[j]))
  return weight * jnp.log(total)


def naive_cosent_np(a, b, y, scale=20.0):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  c = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  terms = [np.exp(scale * (c[i] - c[j])) for i in range(len(y)) for j in range(len(y)) if y[i] < y[j]]
  return np.log1p(np.sum(terms)) if terms else 0.0


def _inputs(seed, b=8, d=6, levels=4):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, d)).astype(np.float32)
  p = (a + rng.normal(size=(b, d))).astype(np.float32)
  y = rng.integers(0, levels, size=b).astype(np.float32)  # with ties
  return a, p, y


def _loss_and_grad(cfg, mesh, a, p, y):
  loss_fn = losses.get("cosent").build(cfg, mesh)

  def f(emb, batch):
    return loss_fn(emb, batch, {}, jnp.int32(0))

  emb, batch = util.put(mesh, ({"query": a, "key": p}, {"score": y}))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(emb, batch)
  return loss, metrics, grads


@pytest.mark.parametrize("n_dev", [1, 8])
def test_matches_double_loop(n_dev):
  a, p, y = _inputs(0, b=16)
  cfg = losses.loss_config("cosent", weight=0.04)
  loss, metrics, grads = _loss_and_grad(cfg, util.mesh(n_dev), a, p, y)
  want, (ga, gp) = jax.value_and_grad(naive_cosent, argnums=(0, 1))(
      jnp.asarray(a), jnp.asarray(p), y, 20.0, 0.04)
  np.testing.assert_allclose(loss, want, **TOL)
  np.testing.assert_allclose(loss, 0.04 * naive_cosent_np(a, p, y), **TOL)
  np.testing.assert_allclose(grads["query"], ga, **TOL)
  np.testing.assert_allclose(grads["key"], gp, **TOL)
  assert metrics["ranked_pairs"] == sum(y[i] < y[j] for i in range(16) for j in range(16))
  c = np.sum(a * p, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(p, axis=-1))
  right = [c[i] < c[j] for i in range(16) for j in range(16) if y[i] < y[j]]
  assert 0 < np.mean(right) < 1
  np.testing.assert_allclose(metrics["pair_accuracy"], np.mean(right), rtol=1e-6)


@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(b=st.integers(1, 6), d=st.integers(1, 4), levels=st.integers(1, 4),
                  scale=st.sampled_from([1.0, 20.0]), seed=st.integers(0, 2**16))
@hypothesis.example(b=3, d=1, levels=2, scale=1.0, seed=109)  # a short 1-d row: float32 noise / |x| ~ 6e-5
def test_property_matches_double_loop(b, d, levels, scale, seed):
  a, p, y = _inputs(seed, b, d, levels)
  loss_fn = lambda a, p, y: pairwise.cosent_loss(a, p, y, scale)[0]
  loss, (ga, gp) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(a, p, y)
  np.testing.assert_allclose(loss, naive_cosent_np(a, p, y, scale), **TOL)
  # The gradient of a cosine w.r.t. x scales as 1/|x|, and so does float32 rounding in it: widen atol by that.
  shortest = min(np.linalg.norm(a, axis=1).min(), np.linalg.norm(p, axis=1).min(), 1.0)
  gtol = dict(rtol=TOL["rtol"], atol=TOL["atol"] / shortest)
  np.testing.assert_allclose(ga, util.fd_grad(lambda x: naive_cosent_np(x, p, y, scale), a), **gtol)
  np.testing.assert_allclose(gp, util.fd_grad(lambda x: naive_cosent_np(a, x, y, scale), p), **gtol)
  assert loss >= 0 and np.isfinite(loss)


def _pairs_with_cosines(cos):
  a = np.tile([[1.0, 0.0]], (len(cos), 1)).astype(np.float32)
  b = np.stack([cos, np.sqrt(1 - np.square(cos))], -1).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(b)


def test_doc_sanity_values():
  # One ranked pair at λ·Δc = ∓8: correct order ≈ e^-8 ≈ 0.0003, reversed ≈ 8.0003.
  y = jnp.asarray([0.0, 1.0])
  right = pairwise.cosent_loss(*_pairs_with_cosines(np.array([0.1, 0.5])), y)[0]
  wrong = pairwise.cosent_loss(*_pairs_with_cosines(np.array([0.5, 0.1])), y)[0]
  np.testing.assert_allclose(right, np.log1p(np.exp(-8.0)), rtol=1e-4)
  np.testing.assert_allclose(wrong, 8.0, atol=1e-3)
  # Two ranked pairs at −8 each: ≈ 0.0007 (the §3.3 check); scaled by the weight in the registered loss.
  y3 = jnp.asarray([0.0, 1.0, 1.0])
  right3 = pairwise.cosent_loss(*_pairs_with_cosines(np.array([0.1, 0.5, 0.5])), y3)[0]
  np.testing.assert_allclose(right3, 0.0007, atol=3e-5)
  loss_fn = losses.get("cosent").build(losses.loss_config("cosent", weight=0.04), None)
  a, b = _pairs_with_cosines(np.array([0.1, 0.5, 0.5]))
  weighted = loss_fn({"query": a, "key": b}, {"score": y3}, {}, 0)[0]
  np.testing.assert_allclose(weighted, 0.04 * right3, rtol=1e-6)


def test_ties_contribute_nothing():
  a, p, _ = _inputs(1, b=5)
  loss, (ga, gp) = jax.value_and_grad(
      lambda a, p: pairwise.cosent_loss(a, p, jnp.ones(5))[0], argnums=(0, 1))(jnp.asarray(a), jnp.asarray(p))
  assert loss == 0.0
  assert not np.any(ga) and not np.any(gp)


def test_large_gap_no_overflow():
  # λ·Δc = 40 for every ranked pair (the maximum with λ = 20).
  a, b = _pairs_with_cosines(np.array([1.0, 1.0, -1.0, -1.0], np.float32))
  loss, g = jax.value_and_grad(lambda a: pairwise.cosent_loss(a, b, jnp.asarray([0.0, 0, 1, 1]))[0])(a)
  np.testing.assert_allclose(loss, 40.0 + np.log(4.0), rtol=1e-6)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("field,value", [
    ("temperature", 0.0), ("temperature", -0.05), ("temperature", float("inf")), ("weight", -1.0),
    ("towers", ("query",)), ("towers", ("a", "a")), ("score_key", "")])
def test_bad_config(field, value):
  with pytest.raises(ConfigError, match=f"config.loss.{field}"):
    losses.loss_config("cosent", **{field: value})


def test_temperature_is_the_inverse_scale():
  a, p, y = _inputs(3, b=6)
  for temperature in (0.05, 0.2):
    loss_fn = losses.get("cosent").build(losses.loss_config("cosent", temperature=temperature), None)
    got = loss_fn({"query": a, "key": p}, {"score": y}, {}, 0)[0]
    np.testing.assert_allclose(got, naive_cosent_np(a, p, y, 1 / temperature), **TOL)


def test_well_ranked_batch_keeps_relative_precision():
  # λ·Δc = −15, −15 and −30: the loss log1p(2e^{−15} + e^{−30}) ≈ 6e-7 is within a few float32 ulps of 1 in
  # 1 + Σ e^x, so log(1 + Σ e^x) is percent-accurate at best; softplus(LSE) keeps float32 relative precision.
  y = jnp.asarray([0.0, 1.0, 2.0])
  a, b = _pairs_with_cosines(np.array([-0.75, 0.0, 0.75]))
  loss, g = jax.value_and_grad(lambda a: pairwise.cosent_loss(a, b, y)[0])(a)
  want = naive_cosent_np(a, b, np.asarray(y))
  assert 0 < want < 1e-6
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  want_g = util.fd_grad(lambda x: naive_cosent_np(x, b, np.asarray(y)) / want, a, h=1e-4) * want
  np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-12)


def test_valid_mask_drops_padded_pairs():
  a, p, y = _inputs(2, b=6)
  valid = np.array([1, 1, 0, 1, 0, 1], bool)
  loss_fn = losses.get("cosent").build(losses.loss_config("cosent"), None)
  got = loss_fn({"query": a, "key": p}, {"score": y, "valid": valid}, {}, 0)[0]
  np.testing.assert_allclose(got, naive_cosent_np(a[valid], p[valid], y[valid]), **TOL)


def test_bad_shapes():
  loss_fn = losses.get("cosent").build(losses.loss_config("cosent"), None)
  a = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r"emb\['key'\] must be \[4, 3\]"):
    loss_fn({"query": a, "key": jnp.ones((4, 2))}, {"score": jnp.ones(4)}, {}, 0)
  with pytest.raises(ValueError, match=r"batch\['score'\] must be \[4\]"):
    loss_fn({"query": a, "key": a}, {"score": jnp.ones(3)}, {}, 0)
  with pytest.raises(ValueError, match="batch has no 'score'"):
    loss_fn({"query": a, "key": a}, {}, {}, 0)
  with pytest.raises(ValueError, match="emb has no 'key'"):
    loss_fn({"query": a}, {"score": jnp.ones(4)}, {}, 0)
  with pytest.raises(ValueError, match=r"score must be \[B\]"):
    pairwise.cosent_loss(a, a, jnp.ones(3))
