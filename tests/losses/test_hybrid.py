"""Piccolo2 hybrid loss against NumPy loops per task, on 1 device and sharded over 8 fake devices."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.losses import hybrid
from big_embed.parallel.mesh import batch_sharding, make_mesh

TOL = dict(rtol=1e-5, atol=1e-5)

# ---------------------------------------------------------------------------------------------------------
# NumPy float64 references, row by row; gradients by central finite differences.


def _cos(u, v):
  return np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))


def _lse(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def np_retrieval(q, p, n, tau=0.01):
  keys = list(p) + ([] if n is None else list(n.reshape(-1, q.shape[1])))
  total = 0.0
  for i in range(q.shape[0]):
    logits = np.array([_cos(q[i], k) for k in keys]) / tau
    total += _lse(logits) - logits[i]
  return total / q.shape[0]


def np_classification(q, p, n, tau=0.05, mask=None):
  total = 0.0
  for i in range(q.shape[0]):
    negs = [n[i, j] for j in range(n.shape[1]) if mask is None or mask[i, j]]
    logits = np.array([_cos(q[i], p[i])] + [_cos(q[i], x) for x in negs]) / tau
    total += _lse(logits) - logits[0]
  return total / q.shape[0]


def np_cosent(q, p, y, scale=20.0):
  c = [_cos(q[i], p[i]) for i in range(len(y))]
  terms = [np.exp(scale * (c[i] - c[j])) for i in range(len(y)) for j in range(len(y)) if y[i] < y[j]]
  return np.log1p(np.sum(terms))


def np_mrl(fn, arrays, dims):
  """Mean over prefixes of fn(*arrays cut to the prefix and re-normalised)."""
  cut = lambda x, m: None if x is None else x[..., :m] / np.linalg.norm(x[..., :m], axis=-1, keepdims=True)
  return np.mean([fn(*[cut(np.float64(x) if x is not None else None, m) for x in arrays]) for m in dims])


def fd_grad(f, x, h=1e-7):
  x = np.float64(x)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _mesh(n):
  return make_mesh({"data": -1}, devices=jax.devices()[:n])


def _put(mesh, tree):
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim)), tree)


def _run(cfg, mesh, emb, batch, task):
  """jit(value_and_grad) w.r.t. emb; the task is static (closed over), the rest of the batch traced."""
  losses.get("hybrid").validate(cfg)
  loss_fn = losses.get("hybrid").build(cfg, mesh)

  def f(emb, batch):
    return loss_fn(emb, {**batch, "task": task}, {}, jnp.int32(0))

  emb, batch = _put(mesh, (emb, batch))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(emb, batch)
  return loss, metrics, grads


def _data(seed, b=8, k=2, d=6):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  p = (q + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
  n = rng.normal(size=(b, k, d)).astype(np.float32)
  y = rng.integers(0, 4, size=b).astype(np.float32)
  return q, p, n, y


def _reference(task, q, p, n, y, dims):
  """(weighted reference loss of (q, p, n), {name: (array, fn of that array)}) for the task."""
  if task == "retrieval":
    fn, w = (lambda q, p, n: np_retrieval(q, p, n)), 1.0
  elif task == "sts":
    fn, w = (lambda q, p, n: np_cosent(q, p, y)), 0.04
  else:
    fn, w = (lambda q, p, n: np_classification(q, p, n)), 0.2
  if dims:
    full = lambda q, p, n: w * np_mrl(fn, (q, p, n), dims)
  else:
    full = lambda q, p, n: w * fn(np.float64(q), np.float64(p), None if n is None else np.float64(n))
  return full


# ---------------------------------------------------------------------------------------------------------
# Value and gradient per task.

CASES = [("retrieval", 1, ()), ("retrieval", 8, ()), ("sts", 1, ()), ("sts", 8, ()),
         ("classification", 1, ()), ("classification", 8, ()),
         ("retrieval", 8, (2, 6)), ("sts", 8, (3, 6)), ("classification", 8, (1, 4, 6))]


@pytest.mark.parametrize("task,n_dev,dims", CASES)
def test_matches_naive(task, n_dev, dims):
  q, p, n, y = _data(0)
  emb = {"query": q, "pos": p} if task == "sts" else {"query": q, "pos": p, "neg": n}
  batch = {"score": y} if task == "sts" else {}
  cfg = losses.loss_config("hybrid", mrl_dims=dims)
  loss, metrics, grads = _run(cfg, _mesh(n_dev), emb, batch, task)
  nn = None if task == "sts" else n
  ref = _reference(task, q, p, nn, y, dims)
  np.testing.assert_allclose(loss, ref(q, p, nn), **TOL)
  np.testing.assert_allclose(grads["query"], fd_grad(lambda x: ref(x, p, nn), q), **TOL)
  np.testing.assert_allclose(grads["pos"], fd_grad(lambda x: ref(q, x, nn), p), **TOL)
  if nn is not None:
    np.testing.assert_allclose(grads["neg"], fd_grad(lambda x: ref(q, p, x), n), **TOL)
  assert f"{task}/loss" in metrics


def test_retrieval_without_negatives_and_flat_negatives():
  q, p, n, _ = _data(1, b=4, k=3)
  fn = losses.get("hybrid").build(losses.loss_config("hybrid"), None)
  no_neg = fn({"query": q, "pos": p}, {"task": "retrieval"}, {}, 0)[0]
  np.testing.assert_allclose(no_neg, np_retrieval(q, p, None), **TOL)
  flat = fn({"query": q, "pos": p, "neg": n.reshape(12, 6)}, {"task": "retrieval"}, {}, 0)[0]
  nested = fn({"query": q, "pos": p, "neg": n}, {"task": "retrieval"}, {}, 0)[0]
  np.testing.assert_allclose(flat, nested, rtol=1e-6)
  np.testing.assert_allclose(flat, np_retrieval(q, p, n), **TOL)


def test_classification_flat_negatives_and_mask():
  q, p, n, _ = _data(2, b=4, k=3)
  fn = losses.get("hybrid").build(losses.loss_config("hybrid", cls_weight=1.0), None)
  nested = fn({"query": q, "pos": p, "neg": n}, {"task": "classification"}, {}, 0)[0]
  flat = fn({"query": q, "pos": p, "neg": n.reshape(12, 6)}, {"task": "classification"}, {}, 0)[0]
  np.testing.assert_allclose(flat, nested, rtol=1e-6)
  mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], bool)
  masked, grads = jax.value_and_grad(lambda n: fn(
      {"query": q, "pos": p, "neg": n}, {"task": "classification", "neg_mask": mask}, {}, 0)[0])(n)
  np.testing.assert_allclose(masked, np_classification(q, p, n, mask=mask), **TOL)
  assert np.all(np.isfinite(grads)) and not np.any(grads[~mask])


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(b=st.integers(1, 4), k=st.integers(1, 3), d=st.integers(2, 5),
                  task=st.sampled_from(["retrieval", "classification"]), seed=st.integers(0, 2**16))
def test_property_shapes(b, k, d, task, seed):
  q, p, n, _ = _data(seed, b, k, d)
  fn = losses.get("hybrid").build(losses.loss_config("hybrid"), None)
  f = jax.jit(jax.value_and_grad(lambda q: fn({"query": q, "pos": p, "neg": n}, {"task": task}, {}, 0)[0]))
  loss, g = f(q)
  ref = _reference(task, q, p, n, None, ())
  np.testing.assert_allclose(loss, ref(q, p, n), **TOL)
  np.testing.assert_allclose(g, fd_grad(lambda x: ref(x, p, n), q), **TOL)


# ---------------------------------------------------------------------------------------------------------
# Task dispatch.


def test_task_aliases_indices_and_default():
  q, p, n, y = _data(3, b=4)
  emb = {"query": q, "pos": p, "neg": n}
  fn = losses.get("hybrid").build(losses.loss_config("hybrid"), None)
  want = {t: fn(emb, {"task": t, "score": y}, {}, 0)[0] for t in hybrid.TASKS}
  for alias, task in [("retri_contrast", "retrieval"), ("cosent", "sts"), ("cls_contrast", "classification"),
                      ("pair_classification", "sts"), (0, "retrieval"), (np.int32(2), "classification"),
                      (b"sts", "sts")]:
    np.testing.assert_allclose(fn(emb, {"task": alias, "score": y}, {}, 0)[0], want[task])
  fixed = losses.get("hybrid").build(losses.loss_config("hybrid", task="sts"), None)
  np.testing.assert_allclose(fixed(emb, {"score": y}, {}, 0)[0], want["sts"])
  np.testing.assert_allclose(want["sts"], 0.04 * np_cosent(q, p, y), **TOL)


def test_task_errors():
  q, p, n, y = _data(4, b=4)
  emb = {"query": q, "pos": p, "neg": n}
  fn = losses.get("hybrid").build(losses.loss_config("hybrid"), None)
  with pytest.raises(ValueError, match="must be static"):
    jax.jit(lambda t: fn(emb, {"task": t}, {}, 0)[0])(jnp.int32(0))
  with pytest.raises(ValueError, match="task must be one of"):
    fn(emb, {"task": "ranking"}, {}, 0)
  with pytest.raises(ValueError, match="config.loss.task"):
    fn(emb, {}, {}, 0)
  with pytest.raises(ValueError, match="'score'"):
    fn(emb, {"task": "sts"}, {}, 0)
  with pytest.raises(ValueError, match="'neg'"):
    fn({"query": q, "pos": p}, {"task": "classification"}, {}, 0)


def test_bad_shapes():
  q, p, n, y = _data(5, b=4, k=2, d=6)
  fn = losses.get("hybrid").build(losses.loss_config("hybrid"), None)
  with pytest.raises(ValueError, match="query and pos must both be"):
    fn({"query": q, "pos": p[:, :3], "neg": n}, {"task": "retrieval"}, {}, 0)
  with pytest.raises(ValueError, match="neg must be"):
    fn({"query": q, "pos": p, "neg": n[..., :3]}, {"task": "retrieval"}, {}, 0)
  with pytest.raises(ValueError, match="multiple of B=4"):
    fn({"query": q, "pos": p, "neg": n.reshape(8, 6)[:7]}, {"task": "classification"}, {}, 0)
  with pytest.raises(ValueError, match="neg_mask must be"):
    fn({"query": q, "pos": p, "neg": n}, {"task": "classification", "neg_mask": np.ones((4, 3), bool)}, {}, 0)
  with pytest.raises(ValueError, match="score"):
    fn({"query": q, "pos": p}, {"task": "sts", "score": y[:3]}, {}, 0)
  mrl = losses.get("hybrid").build(losses.loss_config("hybrid", mrl_dims=(4, 8)), None)
  with pytest.raises(ValueError, match=r"mrl_dims=\(4, 8\) must all be <= the embedding dim D=6"):
    mrl({"query": q, "pos": p, "neg": n}, {"task": "retrieval"}, {}, 0)


# ---------------------------------------------------------------------------------------------------------
# Config.


def test_defaults_follow_piccolo2():
  cfg = losses.loss_config("hybrid")
  assert (cfg.retrieval_temperature, cfg.retrieval_weight) == (0.01, 1.0)
  assert (cfg.sts_scale, cfg.sts_weight) == (20.0, 0.04)
  assert (cfg.cls_temperature, cfg.cls_weight) == (0.05, 0.2)
  assert cfg.mrl_reduction == "mean"


@pytest.mark.parametrize("field,value", [
    ("retrieval_temperature", 0.0), ("cls_temperature", -0.05), ("sts_scale", 0.0), ("sts_weight", -1.0),
    ("retrieval_weight", -1.0), ("cls_weight", -0.2), ("mrl_reduction", "max"), ("mrl_dims", (8, 4)),
    ("mrl_dims", (0,)), ("task", "ranking")])
def test_bad_config(field, value):
  cfg = losses.loss_config("hybrid", **{field: value})
  with pytest.raises(ValueError, match=f"config.loss.{field}"):
    losses.get("hybrid").validate(cfg)
