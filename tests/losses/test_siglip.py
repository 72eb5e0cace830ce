"""SigLIP over the tiled engine (gather and ppermute ring) vs a naive full-matrix sigmoid loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from tests.losses import util


def naive_siglip(valid, ids=None, duplicates="ignore", scale=None, bias=None):
  """(loss, metrics) references: −(1/|B|) Σ_i Σ_j log σ(z_ij ℓ_ij) over the valid rows, ℓ = κ·A Bᵀ + β (full
  [B, B] matrix), κ = exp(t) and β from params unless fixed; accuracy: every positive above every negative."""
  pos, neg = util.pair_masks(valid, ids, duplicates)
  z = np.where(pos, 1.0, -1.0).astype(np.float32)
  live = pos | neg

  def logits(emb, params):
    kappa = jnp.exp(params["logit_scale"]) if scale is None else scale
    beta = params["logit_bias"] if bias is None else bias
    return kappa * emb["image"] @ emb["text"].T + beta

  def ref(emb, params):
    terms = jnp.where(live, -jax.nn.log_sigmoid(z * logits(emb, params)), 0.0)
    return jnp.sum(terms[valid]) / valid.sum()

  def metrics(emb, params):
    l = np.asarray(logits(emb, params), np.float64)
    worst_pos = np.where(pos, l, np.inf).min(1)
    best_neg = np.where(neg, l, -np.inf).max(1)
    return {"accuracy": np.mean((pos.any(1) & (worst_pos > best_neg))[valid])}

  return ref, metrics


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_siglip_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(10)
  valid, ids = util.masks(rng)
  params = {"logit_scale": jnp.float32(np.log(10.0)), "logit_bias": jnp.float32(-3.0)}
  ref, metrics = naive_siglip(valid, ids)
  _, got = util.check("siglip", n, {"image": a, "text": t}, {"valid": valid, "ids": ids}, ref, params=params,
                      tile_size=tile, key_mode=key_mode, metrics_ref=metrics)
  assert 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_siglip_duplicates_as_positives(n, key_mode, tile):
  rng, a, t = util.pairs(11)
  valid, ids = util.masks(rng, n_ids=8)
  ref, metrics = naive_siglip(valid, ids, "positive")
  util.check("siglip", n, {"image": a, "text": t}, {"valid": valid, "ids": ids}, ref, tile_size=tile,
             key_mode=key_mode, duplicates="positive", metrics_ref=metrics)


def test_siglip_init_and_no_clamp():
  cfg = losses.loss_config("siglip")
  assert (cfg.temperature, cfg.learnable_temperature, cfg.max_logit_scale) == (0.1, True, float("inf"))
  spec = losses.get("siglip")
  params = spec.init_params(cfg)
  np.testing.assert_allclose(np.exp(params["logit_scale"]), 10.0, rtol=1e-6)  # κ = 1/temperature
  assert float(params["logit_bias"]) == -10.0
  big = {"logit_scale": jnp.float32(9.0), "logit_bias": jnp.float32(5.0)}
  assert spec.clamp_params(cfg, big) is big


def test_siglip_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature and β = bias_init; the loss at those params is the reference's."""
  rng, a, t = util.pairs(13)
  valid, ids = util.masks(rng)
  ref, _ = naive_siglip(valid, ids, scale=8.0, bias=-4.0)
  params = util.check_init_scale("siglip", {"image": a, "text": t}, {"valid": valid, "ids": ids},
                                 lambda emb: ref(emb, {}), bias_init=-4.0)
  assert float(params["logit_bias"]) == -4.0


def test_siglip_fixed_temperature_and_bias_are_not_params():
  rng, a, t = util.pairs(12)
  valid, ids = util.masks(rng)
  cfg = losses.loss_config("siglip", learnable_temperature=False, learnable_bias=False, temperature=0.2)
  assert losses.get("siglip").init_params(cfg) == {}
  ref, metrics = naive_siglip(valid, ids, scale=5.0, bias=-10.0)
  _, got = util.check("siglip", 1, {"image": a, "text": t}, {"valid": valid, "ids": ids}, ref, tile_size=5,
                      learnable_temperature=False, learnable_bias=False, temperature=0.2, metrics_ref=metrics)
  np.testing.assert_allclose(got["logit_scale"], 5.0, rtol=1e-6)
  assert float(got["logit_bias"]) == -10.0


def test_siglip_frozen_bias_learnable_temperature():
  rng, a, t = util.pairs(14)
  valid, ids = util.masks(rng)
  cfg = losses.loss_config("siglip", learnable_bias=False)
  assert set(losses.get("siglip").init_params(cfg)) == {"logit_scale"}
  ref, metrics = naive_siglip(valid, ids, bias=-10.0)
  util.check("siglip", 1, {"image": a, "text": t}, {"valid": valid, "ids": ids}, ref, tile_size=5,
             learnable_bias=False, metrics_ref=metrics)  # d/d logit_scale checked against the reference
