"""LightCLIP progressive soft negatives over the engine vs a naive full-matrix soft cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed.losses import lightclip
from tests.losses import util


def naive_lightclip(valid, eps, mode="uniform", tau=1.0):
  keep = np.flatnonzero(valid)

  def direction(x, y, scale):
    x, y = x[keep], y[keep]
    n = len(keep)
    eye = jnp.eye(n, dtype=bool)
    logits = scale * x @ y.T
    if mode == "uniform":
      u = jnp.where(eye, 0.0, 1.0 / (n - 1))
    else:
      u = jax.nn.softmax(jnp.where(eye, -jnp.inf, jax.lax.stop_gradient(logits) / tau), axis=1)
    target = (1 - eps) * jnp.eye(n) + eps * u
    return jnp.mean(-jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1))

  def ref(emb, params):
    scale = jnp.exp(params["logit_scale"])
    return 0.5 * (direction(emb["image"], emb["text"], scale) + direction(emb["text"], emb["image"], scale))

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_lightclip_uniform_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(30)
  valid, _ = util.masks(rng)
  # step 600 of a 1000-step linear ramp to 0.2: ε = 0.12.
  util.check("lightclip", n, {"image": a, "text": t}, {"valid": valid}, naive_lightclip(valid, 0.12),
             step=600, tile_size=tile, key_mode=key_mode, epsilon_max=0.2, ramp_steps=1000)


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_lightclip_similarity_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(31)
  valid, _ = util.masks(rng)
  eps = 0.2 * 0.5 * (1 - np.cos(np.pi * 0.25))
  util.check("lightclip", n, {"image": a, "text": t}, {"valid": valid},
             naive_lightclip(valid, eps, "similarity", 2.0), step=250, tile_size=tile, key_mode=key_mode,
             epsilon_max=0.2, ramp_steps=1000, schedule="cosine", soft_neg_mode="similarity",
             similarity_temperature=2.0)


def test_schedules():
  steps = jnp.array([0, 250, 500, 999, 1000, 5000])
  lin = lightclip.epsilon(steps, 0.2, "linear", 1000)
  np.testing.assert_allclose(lin, [0, 0.05, 0.1, 0.1998, 0.2, 0.2], rtol=1e-5)
  cos = lightclip.epsilon(steps, 0.2, "cosine", 1000)
  np.testing.assert_allclose(np.asarray(cos)[[0, 2, 4]], [0, 0.1, 0.2], atol=1e-7)
  assert np.all(np.diff(np.asarray(cos)) >= 0)
  stp = lightclip.epsilon(steps, 0.2, "step", 1000, step_stages=4)
  np.testing.assert_allclose(stp, [0, 0.05, 0.1, 0.15, 0.2, 0.2], rtol=1e-6)


def test_epsilon_zero_at_step_zero_is_clip():
  rng, a, t = util.pairs(32)
  valid, _ = util.masks(rng)
  emb, batch = {"image": a, "text": t}, {"valid": valid}
  light, metrics, _, _ = util.run("lightclip", 1, emb, batch, step=0, tile_size=5, epsilon_max=0.2, ramp_steps=1000)
  clip, _, _, _ = util.run("clip", 1, emb, batch, tile_size=5)
  util.assert_close(light, clip)
  assert float(metrics["epsilon"]) == 0.0
