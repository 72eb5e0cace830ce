"""Matryoshka wrapper against a NumPy loop over prefixes, on 1 device and sharded over 8 fake devices."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.errors import ConfigError
from tests.losses import util

TOL = dict(rtol=1e-5, atol=1e-5)

# ---------------------------------------------------------------------------------------------------------
# NumPy float64 references; gradients by central finite differences.


def np_prefix(x, m):
  x = np.float64(x[:, :m])
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_clip(a, b, scale):
  """Symmetric InfoNCE, row by row."""
  n = a.shape[0]
  total = 0.0
  for i in range(n):
    row = scale * (b @ a[i])
    col = scale * (a @ b[i])
    total += np.log(np.sum(np.exp(row))) - row[i] + np.log(np.sum(np.exp(col))) - col[i]
  return total / (2 * n)


def np_cosent(a, b, y, scale=20.0):
  c = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  terms = [np.exp(scale * (c[i] - c[j])) for i in range(len(y)) for j in range(len(y)) if y[i] < y[j]]
  return np.log1p(np.sum(terms))


def np_matryoshka(inner, a, b, dims, reduction):
  vals = [inner(np_prefix(a, m), np_prefix(b, m)) for m in dims]
  return np.mean(vals) if reduction == "mean" else np.sum(vals)


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _run(cfg, mesh, emb, batch):
  spec = losses.get("matryoshka")
  spec.validate(cfg)
  loss_fn = spec.build(cfg, mesh)
  params = spec.init_params(cfg)

  def f(emb):
    return loss_fn(emb, batch, params, jnp.int32(0))

  emb, batch = util.put(mesh, (emb, batch))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(emb)
  return loss, metrics, grads


def _emb(seed, b=8, d=8):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(b, d)).astype(np.float32)
  return a, (a + rng.normal(size=(b, d))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Value and gradient.


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_clip_inner_matches_naive(reduction, n_dev):
  img, txt = _emb(0)
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("clip", temperature=0.1),
                           dims=(2, 5, 8), reduction=reduction)
  loss, metrics, grads = _run(cfg, util.mesh(n_dev), {"image": img, "text": txt}, {})
  ref = lambda a, b: np_matryoshka(lambda x, y: np_clip(x, y, 10.0), a, b, (2, 5, 8), reduction)
  np.testing.assert_allclose(loss, ref(img, txt), **TOL)
  np.testing.assert_allclose(grads["image"], util.fd_grad(lambda a: ref(a, txt), img), **TOL)
  np.testing.assert_allclose(grads["text"], util.fd_grad(lambda b: ref(img, b), txt), **TOL)
  for m in (2, 5, 8):
    np.testing.assert_allclose(metrics[f"d{m}/loss"], np_clip(np_prefix(img, m), np_prefix(txt, m), 10.0), **TOL)


@pytest.mark.parametrize("n_dev", [1, 8])
def test_cosent_inner_matches_naive(n_dev):
  q, p = _emb(1, b=8, d=6)
  y = np.random.default_rng(1).integers(0, 3, size=8).astype(np.float32)
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("cosent", weight=0.04), dims=(1, 3, 6))
  loss, _, grads = _run(cfg, util.mesh(n_dev), {"query": q, "key": p}, {"score": y})
  ref = lambda a, b: 0.04 * np_matryoshka(lambda x, z: np_cosent(x, z, y), a, b, (1, 3, 6), "mean")
  np.testing.assert_allclose(loss, ref(q, p), **TOL)
  np.testing.assert_allclose(grads["query"], util.fd_grad(lambda a: ref(a, p), q), **TOL)
  np.testing.assert_allclose(grads["key"], util.fd_grad(lambda b: ref(q, b), p), **TOL)


def test_only_listed_towers_are_truncated():
  q, p = _emb(2, b=4, d=6)
  y = np.arange(4, dtype=np.float32)
  extra = np.ones((4, 3), np.float32)  # not an embedding: must be passed through untouched
  inner = losses.loss_config("cosent")
  cfg = losses.loss_config("matryoshka", inner=inner, dims=(2, 6), towers=("query", "key"))
  loss, _, _ = _run(cfg, util.mesh(1), {"query": q, "key": p, "extra": extra}, {"score": y})
  np.testing.assert_allclose(loss, np_matryoshka(lambda x, z: np_cosent(x, z, y), q, p, (2, 6), "mean"), **TOL)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(b=st.integers(1, 4), d=st.integers(1, 6), data=st.data())
def test_property_prefixes(b, d, data):
  dims = sorted(data.draw(st.sets(st.integers(1, d), min_size=1, max_size=3)))
  reduction = data.draw(st.sampled_from(["mean", "sum"]))
  q, p = _emb(data.draw(st.integers(0, 2**16)), b, d)
  y = np.arange(b, dtype=np.float32)[::-1].copy()
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("cosent", temperature=0.2), dims=tuple(dims),
                           reduction=reduction)
  loss_fn = losses.get("matryoshka").build(cfg, None)
  f = jax.jit(jax.value_and_grad(lambda q: loss_fn({"query": q, "key": p}, {"score": y}, {}, 0)[0]))
  loss, g = f(q)
  ref = lambda a: np_matryoshka(lambda x, z: np_cosent(x, z, y, 5.0), a, p, dims, reduction)
  np.testing.assert_allclose(loss, ref(q), **TOL)
  np.testing.assert_allclose(g, util.fd_grad(ref, q), **TOL)


def test_params_delegate_to_inner():
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("clip", max_logit_scale=50.0))
  spec = losses.get("matryoshka")
  params = spec.init_params(cfg)
  np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  clamped = spec.clamp_params(cfg, {"logit_scale": jnp.float32(10.0)})
  np.testing.assert_allclose(clamped["logit_scale"], np.log(50.0), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("field,value", [("dims", ()), ("dims", (8, 4)), ("dims", (4, 4)), ("dims", (0, 4)),
                                         ("reduction", "avg")])
def test_bad_config(field, value):
  with pytest.raises(ConfigError, match=f"config.loss.{field}"):
    losses.loss_config("matryoshka", **{field: value})


def test_inner_is_resolved_and_validated():
  cfg = losses.loss_config("matryoshka", inner={"name": "cosent", "weight": 0.5})
  assert cfg.inner.weight == 0.5 and cfg.inner.temperature == 0.05  # the inner loss's defaults filled in
  with pytest.raises(ConfigError, match=r"config\.loss\.inner\.temperature must be"):
    losses.loss_config("matryoshka", inner={"name": "cosent", "temperature": 0.0})
  with pytest.raises(ConfigError, match=r"config\.loss\.inner must be a loss config"):
    losses.loss_config("matryoshka", inner=None)
  with pytest.raises(ConfigError, match=r"unknown loss 'clp'; config\.loss\.inner\.name must be one of"):
    losses.loss_config("matryoshka", inner={"name": "clp"})


def test_dims_checked_against_embedding_dim_at_call_time():
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("cosent"), dims=(4, 16))
  loss_fn = losses.get("matryoshka").build(cfg, None)
  q, p = _emb(3, b=4, d=8)
  with pytest.raises(ValueError, match=r"dims=\(4, 16\) must all be <= the embedding dim D=8"):
    loss_fn({"query": q, "key": p}, {"score": np.zeros(4, np.float32)}, {}, 0)
  cfg = losses.loss_config("matryoshka", inner=losses.loss_config("cosent"), dims=(2,), towers=("query", "x"))
  with pytest.raises(ValueError, match=r"\['x'\] are not in emb"):
    losses.get("matryoshka").build(cfg, None)({"query": q, "key": p}, {"score": np.zeros(4)}, {}, 0)
