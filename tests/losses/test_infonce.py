"""InfoNCE (multi-positive, hard negatives, false-negative filter) over the engine vs a naive full matrix."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.losses import util

B, D, H = 24, 8, 3
SCALE = 20.0  # the default temperature 0.05


def inputs(seed, n_ids=16):
  rng, q, k = util.pairs(seed)
  hn = util.unit(rng, B, H, D)
  valid, ids = util.masks(rng, n_ids=n_ids)
  hn_valid = rng.random((B, H)) > 0.3
  teacher = rng.normal(size=(B, 1 + H)).astype(np.float32)
  emb = {"query": q, "key": k, "hard_negatives": hn}
  batch = {"valid": valid, "ids": ids, "hard_negative_valid": hn_valid, "teacher_scores": teacher}
  return emb, batch


def logits_and_masks(emb, batch, duplicates="ignore", shared=False, fn=None, fn_scores="student",
                     margin=0.05, ratio=0.95, scale=SCALE):
  """Full logits [B, C] over C = B keys + hard negatives, and (pos, neg) masks; no engine involved."""
  q, k, hn = emb["query"], emb["key"], emb["hard_negatives"]
  valid, ids, hn_valid = batch["valid"], batch.get("ids"), batch["hard_negative_valid"]
  pos, neg = util.pair_masks(valid, ids, duplicates)
  if "key_mask" in batch:
    neg = neg & ~batch["key_mask"]
  if shared:
    dot = jnp.concatenate([q @ k.T, q @ hn.reshape(B * H, D).T], axis=1)  # [B, B + B·H]
    hneg = valid[:, None] & hn_valid.reshape(-1)[None, :]
  else:
    dot = jnp.concatenate([q @ k.T, jnp.einsum("bd,bhd->bh", q, hn)], axis=1)  # [B, B + H]
    hneg = valid[:, None] & hn_valid
  pos = jnp.asarray(np.concatenate([pos, np.zeros(hneg.shape, bool)], axis=1))
  neg = jnp.asarray(np.concatenate([neg, hneg], axis=1))
  if fn is not None:
    def threshold(r):
      m = {"absolute": jnp.full_like(r, margin), "relative": (1 - ratio) * r,
           "max": jnp.maximum(margin, (1 - ratio) * r)}[fn]
      return r - m
    if fn_scores == "student":
      thr = threshold(jax.lax.stop_gradient(jnp.sum(q * k, axis=1)))
      neg = neg & (jax.lax.stop_gradient(dot) < thr[:, None])
    else:
      ts = batch["teacher_scores"]
      drop = ts[:, 1:] >= threshold(jnp.asarray(ts[:, 0]))[:, None]  # [B, H]
      neg = neg & ~jnp.concatenate([jnp.zeros((B, B), bool), drop], axis=1)
  return scale * dot, pos, neg


def naive_infonce(batch, multi="mean", **kw):
  valid = batch["valid"]

  def ref(emb, params):
    del params
    logits, pos, neg = logits_and_masks(emb, batch, **kw)
    l, p, pool = logits[valid], pos[valid], (pos | neg)[valid]
    lse = jax.nn.logsumexp(jnp.where(pool, l, -jnp.inf), axis=1)
    if multi == "mean":
      target = jnp.sum(jnp.where(p, l, 0.0), axis=1) / p.sum(1)
    else:
      target = jax.nn.logsumexp(jnp.where(p, l, -jnp.inf), axis=1)
    return jnp.mean(lse - target)

  return ref


def naive_metrics(batch, scale=None, **kw):
  """accuracy (top-1 column is a positive) and negatives (mean count per row) of the valid rows, NumPy."""
  valid = batch["valid"]

  def ref(emb, params):
    kappa = scale if scale is not None else (np.exp(params["logit_scale"]) if "logit_scale" in params else SCALE)
    logits, pos, neg = (np.asarray(x) for x in logits_and_masks(emb, batch, scale=kappa, **kw))
    return {"accuracy": util.top1(logits[valid], pos[valid], neg[valid]), "negatives": neg[valid].sum(1).mean()}

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_infonce_hard_negatives_matches_naive(n, key_mode, tile):
  emb, batch = inputs(40)
  _, metrics = util.check("infonce", n, emb, batch, naive_infonce(batch), tile_size=tile, key_mode=key_mode,
                          metrics_ref=naive_metrics(batch))
  assert 0 < float(metrics["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_infonce_key_mask(n, key_mode, tile):
  """batch["key_mask"] [B, B]: masked keys are not negatives (the designated positive stays the positive)."""
  emb, batch = inputs(45)
  batch["key_mask"] = np.random.default_rng(45).random((B, B)) < 0.3
  util.check("infonce", n, emb, batch, naive_infonce(batch), tile_size=tile, key_mode=key_mode,
             metrics_ref=naive_metrics(batch))


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_infonce_shared_negatives_multi_positive(n, key_mode, tile):
  emb, batch = inputs(41, n_ids=8)
  util.check("infonce", n, emb, batch, naive_infonce(batch, "lse", duplicates="positive", shared=True),
             tile_size=tile, key_mode=key_mode, hard_negatives_shared=True, duplicates="positive",
             multi_positive="lse", metrics_ref=naive_metrics(batch, duplicates="positive", shared=True))


@pytest.mark.parametrize("fn,ratio", [("absolute", 0.5), ("relative", 0.5), ("max", 0.5), ("relative", 0.8),
                                      ("max", 0.8)])
def test_infonce_student_false_negative_filter(fn, ratio):
  """At ρ = 0.5 the relative margin (1 − ρ)·r(+) equals ρ·r(+); ρ = 0.8 tells them apart."""
  emb, batch = inputs(42)
  # A margin that keeps some negatives and drops others on these inputs.
  kw = dict(fn_filter=fn, fn_margin=0.3 if ratio == 0.5 else 0.1, fn_ratio=ratio)
  ref_kw = dict(fn=fn, margin=kw["fn_margin"], ratio=ratio)
  loss, metrics = util.check("infonce", 8, emb, batch, naive_infonce(batch, **ref_kw), tile_size=7,
                             metrics_ref=naive_metrics(batch, **ref_kw), **kw)
  _, plain, _, _ = util.run("infonce", 8, emb, batch, tile_size=7)
  assert float(metrics["negatives"]) < float(plain["negatives"])


def test_infonce_teacher_false_negative_filter():
  emb, batch = inputs(43)
  util.check("infonce", 8, emb, batch, naive_infonce(batch, fn="max", fn_scores="teacher", margin=0.2),
             tile_size=7, fn_filter="max", fn_scores="teacher", fn_margin=0.2,
             metrics_ref=naive_metrics(batch, fn="max", fn_scores="teacher", margin=0.2))


def test_infonce_learnable_temperature():
  emb, batch = inputs(44)
  params = {"logit_scale": jnp.float32(np.log(SCALE))}

  def ref(emb, params):
    logits, pos, neg = logits_and_masks(emb, batch)
    logits = logits / SCALE * jnp.exp(params["logit_scale"])
    valid = batch["valid"]
    l, p, pool = logits[valid], pos[valid], (pos | neg)[valid]
    return jnp.mean(jax.nn.logsumexp(jnp.where(pool, l, -jnp.inf), 1) - jnp.sum(jnp.where(p, l, 0.0), 1))

  util.check("infonce", 1, emb, batch, ref, params=params, tile_size=5, learnable_temperature=True,
             metrics_ref=naive_metrics(batch))


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True)
@hypothesis.given(seed=st.integers(0, 2**16), n_invalid=st.integers(0, 23), n_ids=st.sampled_from([2, 5, 24]),
                  hn_keep=st.floats(0.0, 1.0))
def test_infonce_property_random_masks_8_devices(seed, n_invalid, n_ids, hn_keep):
  """Random padding, duplicate ids and hard-negative masks (same shapes: one compile for all examples)."""
  emb, batch = inputs(seed, n_ids=n_ids)
  rng = np.random.default_rng(seed)
  valid = np.ones(B, bool)
  valid[rng.choice(B, n_invalid, replace=False)] = False
  batch["valid"] = valid
  batch["hard_negative_valid"] = rng.random((B, H)) < hn_keep
  util.check("infonce", 8, emb, batch, naive_infonce(batch), tile_size=7, key_mode="gather")
