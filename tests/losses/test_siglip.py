"""SigLIP over the tiled engine (gather and ppermute ring) vs a naive full-matrix sigmoid loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from tests.losses import util


def naive_siglip(valid, ids=None, duplicates="ignore"):
  """−(1/|B|) Σ_i Σ_j log σ(z_ij ℓ_ij) over the valid rows, ℓ = exp(t')·A Bᵀ + b (full [B, B] matrix)."""
  pos, neg = util.pair_masks(valid, ids, duplicates)
  z = np.where(pos, 1.0, -1.0).astype(np.float32)
  live = pos | neg

  def ref(emb, params):
    logits = jnp.exp(params["logit_scale"]) * emb["image"] @ emb["text"].T + params["logit_bias"]
    terms = jnp.where(live, -jax.nn.log_sigmoid(z * logits), 0.0)
    return jnp.sum(terms[valid]) / valid.sum()

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_siglip_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(10)
  valid, ids = util.masks(rng)
  params = {"logit_scale": jnp.float32(np.log(10.0)), "logit_bias": jnp.float32(-3.0)}
  util.check("siglip", n, {"image": a, "text": t}, {"valid": valid, "ids": ids}, naive_siglip(valid, ids),
             params=params, tile_size=tile, key_mode=key_mode)


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_siglip_duplicates_as_positives(n, key_mode, tile):
  rng, a, t = util.pairs(11)
  valid, ids = util.masks(rng, n_ids=8)
  util.check("siglip", n, {"image": a, "text": t}, {"valid": valid, "ids": ids},
             naive_siglip(valid, ids, "positive"), tile_size=tile, key_mode=key_mode, duplicates="positive")


def test_siglip_init_and_no_clamp():
  cfg = losses.loss_config("siglip")
  spec = losses.get("siglip")
  params = spec.init_params(cfg)
  np.testing.assert_allclose(params["logit_scale"], np.log(10.0), rtol=1e-6)
  assert float(params["logit_bias"]) == -10.0
  big = {"logit_scale": jnp.float32(9.0), "logit_bias": jnp.float32(5.0)}
  assert spec.clamp_params(cfg, big) is big


def test_siglip_frozen_bias_gets_no_gradient():
  rng, a, t = util.pairs(12)
  valid, ids = util.masks(rng)
  _, metrics, _, g = util.run("siglip", 1, {"image": a, "text": t}, {"valid": valid, "ids": ids}, tile_size=5,
                              learnable_bias=False)
  assert float(g["logit_bias"]) == 0.0 and float(g["logit_scale"]) != 0.0
  assert float(metrics["logit_bias"]) == -10.0
