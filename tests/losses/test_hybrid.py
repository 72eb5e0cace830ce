"""Piccolo2 hybrid loss against NumPy loops per task, on 1 device and sharded over 8 fake devices."""

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
# NumPy float64 references, row by row; gradients by central finite differences.


def _cos(u, v):
  return np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))


def _lse(x):
  m = np.max(x)
  return m + np.log(np.sum(np.exp(x - m)))


def np_retrieval(q, p, n, tau=0.01, shards=1, valid=None, ids=None, n_valid=None, accuracy=False):
  """Row by row; with `shards` > 1 each block of rows sees only its own keys and hard negatives (key_mode
  "local"). Padded rows are neither queries nor keys, nor are their hard negatives; keys sharing row i's id
  (other than key i) are left out of row i's pool. accuracy: the share of rows whose positive scores at least
  every other pool column, instead of the loss."""
  b, d = q.shape
  h = 0 if n is None else n.reshape(b, -1, d).shape[1]
  valid = np.ones(b, bool) if valid is None else valid
  n_valid = np.ones((b, h), bool) if n_valid is None else n_valid
  per = b // shards
  total, rows, right = 0.0, 0, 0
  for i in range(b):
    if not valid[i]:
      continue
    lo, hi = (i // per) * per, (i // per + 1) * per
    keys = [p[j] for j in range(lo, hi)
            if valid[j] and (j == i or ids is None or ids[j] != ids[i])]
    keys += [n.reshape(b, h, d)[j, m] for j in range(lo, hi) for m in range(h) if valid[j] and n_valid[j, m]]
    logits = np.array([_cos(q[i], k) for k in keys]) / tau
    total += _lse(logits) - _cos(q[i], p[i]) / tau
    right += _cos(q[i], p[i]) / tau >= logits.max()
    rows += 1
  return right / rows if accuracy else total / rows


def np_classification(q, p, n, tau=0.05, mask=None, accuracy=False):
  total, right = 0.0, 0
  for i in range(q.shape[0]):
    negs = [n[i, j] for j in range(n.shape[1]) if mask is None or mask[i, j]]
    logits = np.array([_cos(q[i], p[i])] + [_cos(q[i], x) for x in negs]) / tau
    total += _lse(logits) - logits[0]
    right += logits[0] >= logits.max()
  return (right if accuracy else total) / q.shape[0]


def np_cosent(q, p, y, scale=20.0):
  c = [_cos(q[i], p[i]) for i in range(len(y))]
  terms = [np.exp(scale * (c[i] - c[j])) for i in range(len(y)) for j in range(len(y)) if y[i] < y[j]]
  return np.log1p(np.sum(terms))


def np_mrl(fn, arrays, dims):
  """Mean over prefixes of fn(*arrays cut to the prefix and re-normalised)."""
  cut = lambda x, m: None if x is None else x[..., :m] / np.linalg.norm(x[..., :m], axis=-1, keepdims=True)
  return np.mean([fn(*[cut(np.float64(x) if x is not None else None, m) for x in arrays]) for m in dims])


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _run(cfg, mesh, emb, batch, task):
  """jit(value_and_grad) w.r.t. emb of the loss built for the (static) task type."""
  loss_fn = losses.get("hybrid").build(cfg, mesh, task)

  def f(emb, batch):
    return loss_fn(emb, batch, {}, jnp.int32(0))

  emb, batch = util.put(mesh, (emb, batch))
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(emb, batch)
  return loss, metrics, grads


def _data(seed, b=8, h=2, d=6):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  p = (q + 0.5 * rng.normal(size=(b, d))).astype(np.float32)
  n = rng.normal(size=(b, h, d)).astype(np.float32)
  y = rng.integers(0, 4, size=b).astype(np.float32)
  return q, p, n, y


def _reference(task, y, dims, shards=1):
  """Weighted reference loss as a function of (q, p, n)."""
  if task == "retrieval":
    fn, w = (lambda q, p, n: np_retrieval(q, p, n, shards=shards)), 1.0
  elif task == "sts":
    fn, w = (lambda q, p, n: np_cosent(q, p, y)), 0.04
  else:
    fn, w = (lambda q, p, n: np_classification(q, p, n)), 0.2
  if dims:
    return lambda q, p, n: w * np_mrl(fn, (q, p, n), dims)
  return lambda q, p, n: w * fn(np.float64(q), np.float64(p), None if n is None else np.float64(n))


# ---------------------------------------------------------------------------------------------------------
# Value and gradient per task.

CASES = [("retrieval", 1, (), "local"), ("retrieval", 8, (), "local"), ("retrieval", 8, (), "gather"),
         ("sts", 1, (), "local"), ("sts", 8, (), "local"),
         ("classification", 1, (), "local"), ("classification", 8, (), "local"),
         ("retrieval", 8, (2, 6), "gather"), ("sts", 8, (3, 6), "local"), ("classification", 8, (1, 4, 6), "local")]


@pytest.mark.parametrize("task,n_dev,dims,key_mode", CASES)
def test_matches_naive(task, n_dev, dims, key_mode):
  q, p, n, y = _data(0, b=16 if task == "retrieval" else 8)
  n[:2, 0] = 1.3 * q[:2]  # two rows whose hard negative outscores the positive: accuracy < 1
  emb = {"query": q, "key": p} if task == "sts" else {"query": q, "key": p, "hard_negatives": n}
  batch = {"score": y} if task == "sts" else {}
  cfg = losses.loss_config("hybrid", mrl_dims=dims, key_mode=key_mode, tile_size=8)
  loss, metrics, grads = _run(cfg, util.mesh(n_dev), emb, batch, task)
  nn = None if task == "sts" else n
  ref = _reference(task, y, dims, shards=n_dev if key_mode == "local" else 1)
  np.testing.assert_allclose(loss, ref(q, p, nn), **TOL)
  if task != "sts" and not dims:
    shards = n_dev if key_mode == "local" else 1
    want = (np_retrieval(q, p, n, shards=shards, accuracy=True) if task == "retrieval"
            else np_classification(q, p, n, accuracy=True))
    assert 0 < want < 1
    np.testing.assert_allclose(metrics[f"{task}/accuracy"], want, rtol=1e-6)
  np.testing.assert_allclose(grads["query"], util.fd_grad(lambda x: ref(x, p, nn), q, h=1e-7), **TOL)
  np.testing.assert_allclose(grads["key"], util.fd_grad(lambda x: ref(q, x, nn), p, h=1e-7), **TOL)
  if nn is not None:
    np.testing.assert_allclose(grads["hard_negatives"], util.fd_grad(lambda x: ref(q, p, x), n, h=1e-7), **TOL)
  assert f"{task}/loss" in metrics


def _built(task, **fields):
  return losses.get("hybrid").build(losses.loss_config("hybrid", **fields), None, task)


def test_retrieval_without_negatives_and_flat_negatives():
  q, p, n, _ = _data(1, b=4, h=3)
  fn = _built("retrieval")
  no_neg = fn({"query": q, "key": p}, {}, {}, 0)[0]
  np.testing.assert_allclose(no_neg, np_retrieval(q, p, None), **TOL)
  flat = fn({"query": q, "key": p, "hard_negatives": n.reshape(12, 6)}, {}, {}, 0)[0]
  nested = fn({"query": q, "key": p, "hard_negatives": n}, {}, {}, 0)[0]
  np.testing.assert_allclose(flat, nested, rtol=1e-6)
  np.testing.assert_allclose(flat, np_retrieval(q, p, n), **TOL)


def test_retrieval_padding_and_duplicate_ids():
  q, p, n, _ = _data(2, b=8, h=2)
  valid = np.array([1, 1, 1, 0, 1, 1, 0, 1], bool)
  ids = np.array([0, 1, 0, 2, 3, 1, 4, 5], np.int32)
  n_valid = np.array([[1, 0]] * 4 + [[1, 1]] * 4, bool)
  cfg = losses.loss_config("hybrid", key_mode="gather")
  batch = {"valid": valid, "ids": ids, "hard_negative_valid": n_valid}
  loss, _, grads = _run(cfg, util.mesh(8), {"query": q, "key": p, "hard_negatives": n}, batch, "retrieval")
  ref = lambda q: np_retrieval(np.float64(q), np.float64(p), np.float64(n), valid=valid, ids=ids, n_valid=n_valid)
  np.testing.assert_allclose(loss, ref(q), **TOL)
  np.testing.assert_allclose(grads["query"], util.fd_grad(ref, q, h=1e-7), **TOL)
  assert not np.any(grads["query"][~valid]) and not np.any(grads["hard_negatives"][~valid])


def test_classification_flat_negatives_mask_and_padding():
  q, p, n, _ = _data(3, b=4, h=3)
  fn = _built("classification", classification=dict(weight=1.0))
  nested = fn({"query": q, "key": p, "hard_negatives": n}, {}, {}, 0)[0]
  flat = fn({"query": q, "key": p, "hard_negatives": n.reshape(12, 6)}, {}, {}, 0)[0]
  np.testing.assert_allclose(flat, nested, rtol=1e-6)
  mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], bool)
  valid = np.array([1, 1, 1, 0], bool)
  batch = {"hard_negative_valid": mask, "valid": valid}
  masked, grads = jax.value_and_grad(lambda n: fn({"query": q, "key": p, "hard_negatives": n}, batch, {}, 0)[0])(n)
  np.testing.assert_allclose(masked, np_classification(q[:3], p[:3], n[:3], mask=mask[:3]), **TOL)
  assert np.all(np.isfinite(grads)) and not np.any(grads[~mask]) and not np.any(grads[3])


def test_sts_padding():
  q, p, _, y = _data(4, b=6)
  valid = np.array([1, 0, 1, 1, 1, 0], bool)
  got = _built("sts")({"query": q, "key": p}, {"score": y, "valid": valid}, {}, 0)[0]
  np.testing.assert_allclose(got, 0.04 * np_cosent(q[valid], p[valid], y[valid]), **TOL)


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(b=st.integers(1, 4), h=st.integers(1, 3), d=st.integers(2, 5),
                  task=st.sampled_from(["retrieval", "classification", "classification"]),
                  seed=st.integers(0, 2**16))
def test_property_shapes(b, h, d, task, seed):
  q, p, n, _ = _data(seed, b, h, d)
  fn = _built(task, tile_size=3)
  emb = lambda q: {"query": q, "key": p, "hard_negatives": n}
  f = jax.jit(jax.value_and_grad(lambda q: fn(emb(q), {}, {}, 0)[0]))
  loss, g = f(q)
  ref = _reference(task, None, ())
  np.testing.assert_allclose(loss, ref(q, p, n), **TOL)
  # τ = 0.01 saturates the softmax; the engine's softplus(LSE(neg) − ℓ_pos) form keeps 1e-5 there too.
  np.testing.assert_allclose(g, util.fd_grad(lambda x: ref(x, p, n), q), **TOL)


# ---------------------------------------------------------------------------------------------------------
# Task types and config groups.


def test_per_task_groups_set_temperature_and_weight():
  q, p, n, y = _data(5, b=4)
  emb, batch = {"query": q, "key": p, "hard_negatives": n}, {"score": y}
  groups = dict(retrieval=dict(temperature=0.02, weight=0.5), sts=dict(temperature=0.1, weight=0.3),
                classification=dict(temperature=0.1, weight=2.0))
  got = {t: _built(t, **groups)(emb, batch, {}, 0)[0] for t in ("retrieval", "sts", "classification")}
  np.testing.assert_allclose(got["retrieval"], 0.5 * np_retrieval(q, p, n, tau=0.02), **TOL)
  np.testing.assert_allclose(got["sts"], 0.3 * np_cosent(q, p, y, scale=10.0), **TOL)
  np.testing.assert_allclose(got["classification"], 2.0 * np_classification(q, p, n, tau=0.1), **TOL)


def test_a_group_is_merged_field_by_field():
  cfg = losses.loss_config("hybrid", sts=dict(weight=0.1))
  assert (cfg.sts.temperature, cfg.sts.weight) == (0.05, 0.1)
  assert losses.task_types(cfg) == ("retrieval", "sts", "classification")
  with pytest.raises(ConfigError, match=r"config\.loss\.sts\.scale is not a field of the 'sts' group"):
    losses.loss_config("hybrid", sts=dict(scale=20.0))
  with pytest.raises(ConfigError, match=r"config\.loss\.sts must be a group of fields"):
    losses.loss_config("hybrid", sts=0.05)


@pytest.mark.parametrize("task", [None, "multilabel", "retri_contrast"])
def test_task_it_cannot_train_is_a_config_error(task):
  with pytest.raises(ConfigError, match="hybrid loss trains on text batches of task type retrieval, sts"):
    _built(task)


def test_input_errors():
  q, p, n, y = _data(6, b=4)
  with pytest.raises(ValueError, match="batch has no 'score'"):
    _built("sts")({"query": q, "key": p, "hard_negatives": n}, {}, {}, 0)
  with pytest.raises(ValueError, match="emb has no 'hard_negatives'"):
    _built("classification")({"query": q, "key": p}, {}, {}, 0)


def test_bad_shapes():
  q, p, n, y = _data(7, b=4, h=2, d=6)
  retrieval, classification, sts = _built("retrieval"), _built("classification"), _built("sts")
  with pytest.raises(ValueError, match="query and key must both be"):
    retrieval({"query": q, "key": p[:, :3], "hard_negatives": n}, {}, {}, 0)
  with pytest.raises(ValueError, match="hard negatives must be"):
    retrieval({"query": q, "key": p, "hard_negatives": n[..., :3]}, {}, {}, 0)
  with pytest.raises(ValueError, match="multiple of B=4"):
    classification({"query": q, "key": p, "hard_negatives": n.reshape(8, 6)[:7]}, {}, {}, 0)
  with pytest.raises(ValueError, match="hard_negative_valid must be"):
    classification({"query": q, "key": p, "hard_negatives": n}, {"hard_negative_valid": np.ones((4, 3), bool)}, {}, 0)
  with pytest.raises(ValueError, match=r"batch\['score'\] must be \[4\]"):
    sts({"query": q, "key": p}, {"score": y[:3]}, {}, 0)
  with pytest.raises(ValueError, match=r"batch\['valid'\] must be \[4\]"):
    sts({"query": q, "key": p}, {"score": y, "valid": np.ones(3, bool)}, {}, 0)
  with pytest.raises(ValueError, match=r"mrl_dims=\(4, 8\) must all be <= the embedding dim D=6"):
    _built("retrieval", mrl_dims=(4, 8))({"query": q, "key": p, "hard_negatives": n}, {}, {}, 0)


# ---------------------------------------------------------------------------------------------------------
# Config.


def test_defaults_follow_piccolo2():
  cfg = losses.loss_config("hybrid")
  assert (cfg.retrieval.temperature, cfg.retrieval.weight) == (0.01, 1.0)
  assert (cfg.sts.temperature, cfg.sts.weight) == (0.05, 0.04)
  assert (cfg.classification.temperature, cfg.classification.weight) == (0.05, 0.2)
  assert cfg.mrl_reduction == "mean"


@pytest.mark.parametrize("field,value", [
    ("retrieval", dict(temperature=0.0)), ("classification", dict(temperature=-0.05)), ("sts", dict(temperature=0.0)),
    ("sts", dict(weight=-1.0)), ("retrieval", dict(weight=-1.0)), ("classification", dict(weight=-0.2)),
    ("mrl_reduction", "max"), ("mrl_dims", (8, 4)), ("mrl_dims", (0,)), ("key_mode", "all"), ("tile_size", 0),
    ("key_tower", "")])
def test_bad_config(field, value):
  path = field + ("." + next(iter(value)) if isinstance(value, dict) else "")
  with pytest.raises(ConfigError, match=f"config.loss.{path}"):
    losses.loss_config("hybrid", **{field: value})
