"""CLIP over the tiled engine vs a naive full-matrix symmetric InfoNCE (1 and 8 devices, several tiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from tests.losses import util


def naive_clip(valid, ids=None, duplicates="ignore", blocks=1, key_mask=None, scale=None):
  """(loss reference, accuracy reference) over full [B, B] logits; rows = valid pairs; `blocks` > 1 keeps only
  same-block columns (per-device); key_mask [B, B]: text j is not a negative of image i, nor image i of text j.
  scale: a fixed κ (else exp(params["logit_scale"]))."""
  pos, neg = util.pair_masks(valid, ids, duplicates)
  b = len(valid)
  block = np.arange(b) // (b // blocks)
  same_block = block[:, None] == block[None, :]
  pos, neg = pos & same_block, neg & same_block
  masks = {"a2b": (pos, neg), "b2a": (pos.T, neg.T)}
  if key_mask is not None:
    masks = {"a2b": (pos, neg & ~key_mask), "b2a": (pos.T, neg.T & ~key_mask.T)}

  def direction(x, y, kappa, which):
    p, n = masks[which]
    logits = kappa * x @ y.T  # [B, B]
    l, p, pool = logits[valid], p[valid], (p | n)[valid]
    lse = jax.nn.logsumexp(jnp.where(pool, l, -jnp.inf), axis=1)
    target = jnp.sum(jnp.where(p, l, 0.0), axis=1) / p.sum(1)
    return jnp.mean(lse - target)

  def kappa(params):
    return scale if scale is not None else jnp.exp(params["logit_scale"])

  def ref(emb, params):
    k = kappa(params)
    return 0.5 * (direction(emb["image"], emb["text"], k, "a2b") + direction(emb["text"], emb["image"], k, "b2a"))

  def accuracy(emb, params):
    k = kappa(params)
    logits = np.asarray(k * emb["image"] @ emb["text"].T)
    (p_ab, n_ab), (p_ba, n_ba) = masks["a2b"], masks["b2a"]
    return {"accuracy": 0.5 * (util.top1(logits[valid], p_ab[valid], n_ab[valid]) +
                               util.top1(logits.T[valid], p_ba[valid], n_ba[valid]))}

  return ref, accuracy


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_clip_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(0)
  valid, ids = util.masks(rng)
  emb, batch = {"image": a, "text": t}, {"valid": valid, "ids": ids}
  ref, accuracy = naive_clip(valid, ids)
  _, metrics = util.check("clip", n, emb, batch, ref, tile_size=tile, key_mode=key_mode, metrics_ref=accuracy)
  assert 0 < float(metrics["accuracy"]) < 1  # the inputs tell a right accuracy from a constant one


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_clip_duplicates_as_positives(n, key_mode, tile):
  rng, a, t = util.pairs(1)
  valid, ids = util.masks(rng, n_ids=8)
  emb, batch = {"image": a, "text": t}, {"valid": valid, "ids": ids}
  params = {"logit_scale": jnp.float32(3.2)}
  ref, accuracy = naive_clip(valid, ids, "positive")
  util.check("clip", n, emb, batch, ref, params=params, tile_size=tile, key_mode=key_mode, duplicates="positive",
             metrics_ref=accuracy)


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_clip_key_mask(n, key_mode, tile):
  """An arbitrary [B, B] mask of related pairs, not symmetric; the ring and gather look columns up globally."""
  rng, a, t = util.pairs(5)
  valid, ids = util.masks(rng)
  key_mask = rng.random((24, 24)) < 0.3
  emb, batch = {"image": a, "text": t}, {"valid": valid, "ids": ids, "key_mask": key_mask}
  ref, accuracy = naive_clip(valid, ids, key_mask=key_mask)
  loss, _ = util.check("clip", n, emb, batch, ref, tile_size=tile, key_mode=key_mode, metrics_ref=accuracy)
  unmasked, _, _, _ = util.run("clip", n, emb, {"valid": valid, "ids": ids}, tile_size=tile, key_mode=key_mode)
  assert float(loss) < float(unmasked)  # fewer negatives


def test_clip_local_negatives_per_device():
  rng, a, t = util.pairs(2)
  valid = np.ones(24, bool)
  util.check("clip", 8, {"image": a, "text": t}, {"valid": valid}, naive_clip(valid, blocks=8)[0], tile_size=2,
             key_mode="local")


def test_clip_fixed_temperature_has_no_param():
  _, a, t = util.pairs(3)
  valid = np.ones(24, bool)
  cfg = losses.loss_config("clip", learnable_temperature=False, temperature=0.1)
  assert losses.get("clip").init_params(cfg) == {}
  ref, accuracy = naive_clip(valid, scale=10.0)
  _, metrics = util.check("clip", 1, {"image": a, "text": t}, {}, ref, tile_size=5, learnable_temperature=False,
                          temperature=0.1, metrics_ref=accuracy)
  np.testing.assert_allclose(metrics["logit_scale"], 10.0, rtol=1e-6)
  assert set(metrics) >= {"loss", "accuracy", "logit_scale", "loss_a2b", "loss_b2a"}


def test_clip_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  rng, a, t = util.pairs(6)
  valid, ids = util.masks(rng)
  ref, _ = naive_clip(valid, ids, scale=8.0)
  util.check_init_scale("clip", {"image": a, "text": t}, {"valid": valid, "ids": ids}, lambda emb: ref(emb, {}))


def test_clip_foundation_interface():
  cfg = losses.loss_config("clip")
  assert tuple(cfg.towers) == ("image", "text")
  assert cfg.temperature == 0.07 and cfg.learnable_temperature and cfg.max_logit_scale == 100.0
  spec = losses.get("clip")
  params = spec.init_params(cfg)
  np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  clamped = spec.clamp_params(cfg, {"logit_scale": jnp.float32(7.0)})
  np.testing.assert_allclose(clamped["logit_scale"], np.log(100.0), rtol=1e-6)
  assert float(spec.clamp_params(cfg, {"logit_scale": jnp.float32(-1.0)})["logit_scale"]) == 0.0


def test_clip_perfect_alignment_is_accurate():
  rng = np.random.default_rng(4)
  a = util.unit(rng, 24, 8)
  loss, metrics, _, _ = util.run("clip", 1, {"image": a, "text": a}, {}, params={"logit_scale": jnp.float32(4.6)},
                                 tile_size=5)
  assert float(metrics["accuracy"]) == 1.0
  assert float(loss) < 1.0
