"""CLIP over the tiled engine vs a naive full-matrix symmetric InfoNCE (1 and 8 devices, several tiles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from tests.losses import util


def naive_clip(valid, ids=None, duplicates="ignore", blocks=1):
  """Full [B, B] logits; rows = valid pairs; `blocks` > 1 keeps only same-block columns (per-device)."""
  pos, neg = util.pair_masks(valid, ids, duplicates)
  b = len(valid)
  block = np.arange(b) // (b // blocks)
  same_block = block[:, None] == block[None, :]
  pos, neg = pos & same_block, neg & same_block

  def direction(x, y, scale):
    logits = scale * x @ y.T  # [B, B]
    l, p, pool = logits[valid], pos[valid], (pos | neg)[valid]
    lse = jax.nn.logsumexp(jnp.where(pool, l, -jnp.inf), axis=1)
    target = jnp.sum(jnp.where(p, l, 0.0), axis=1) / p.sum(1)
    return jnp.mean(lse - target)

  def ref(emb, params):
    scale = jnp.exp(params["logit_scale"])
    return 0.5 * (direction(emb["image"], emb["text"], scale) + direction(emb["text"], emb["image"], scale))

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_clip_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(0)
  valid, ids = util.masks(rng)
  emb, batch = {"image": a, "text": t}, {"valid": valid, "ids": ids}
  util.check("clip", n, emb, batch, naive_clip(valid, ids), tile_size=tile, key_mode=key_mode)


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_clip_duplicates_as_positives(n, key_mode, tile):
  rng, a, t = util.pairs(1)
  valid, ids = util.masks(rng, n_ids=8)
  emb, batch = {"image": a, "text": t}, {"valid": valid, "ids": ids}
  params = {"logit_scale": jnp.float32(3.2)}
  util.check("clip", n, emb, batch, naive_clip(valid, ids, "positive"), params=params, tile_size=tile,
             key_mode=key_mode, duplicates="positive")


def test_clip_local_negatives_per_device():
  rng, a, t = util.pairs(2)
  valid = np.ones(24, bool)
  util.check("clip", 8, {"image": a, "text": t}, {"valid": valid}, naive_clip(valid, blocks=8), tile_size=2,
             key_mode="local")


def test_clip_without_batch_extras_and_fixed_temperature():
  _, a, t = util.pairs(3)
  valid = np.ones(24, bool)
  loss, metrics, _, g_params = util.run("clip", 1, {"image": a, "text": t}, {}, tile_size=5,
                                        learnable_temperature=False)
  want = naive_clip(valid)({"image": jnp.asarray(a), "text": jnp.asarray(t)}, {"logit_scale": np.log(1 / 0.07)})
  util.assert_close(loss, want)
  assert float(g_params["logit_scale"]) == 0.0
  np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=1e-6)
  assert set(metrics) >= {"loss", "accuracy", "logit_scale", "loss_a2b", "loss_b2a"}


def test_clip_foundation_interface():
  cfg = losses.loss_config("clip")
  assert tuple(cfg.towers) == ("image", "text")
  assert cfg.temperature_init == 0.07 and cfg.learnable_temperature and cfg.max_logit_scale == 100.0
  spec = losses.get("clip")
  spec.validate(cfg)
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
