"""LightCLIP progressive soft negatives over the engine vs a naive full-matrix soft cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed.losses import lightclip
from tests.losses import util


def naive_lightclip(valid, eps, mode="uniform", tau=1.0, scale=None):
  """(loss, metrics) references over the full matrix of valid pairs: the soft cross-entropy, its KL to the
  targets (the target entropy subtracted) and the top-1 accuracy; scale: a fixed κ (else exp(t))."""
  keep = np.flatnonzero(valid)
  n = len(keep)
  eye = np.eye(n, dtype=bool)

  def direction(x, y, kappa):
    """(soft CE, KL to the targets, logits) of rows x against columns y."""
    logits = kappa * x[keep] @ y[keep].T
    if mode == "uniform":
      u = jnp.where(eye, 0.0, 1.0 / (n - 1))
    else:
      u = jax.nn.softmax(jnp.where(eye, -jnp.inf, jax.lax.stop_gradient(logits) / tau), axis=1)
    target = (1 - eps) * jnp.eye(n) + eps * u
    log_p = jax.nn.log_softmax(logits, axis=1)
    kl = jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - log_p), 0.0)
    return jnp.mean(-jnp.sum(target * log_p, axis=1)), jnp.mean(jnp.sum(kl, axis=1)), logits

  def kappa(params):
    return jnp.exp(params["logit_scale"]) if scale is None else scale

  def ref(emb, params):
    a2b = direction(emb["image"], emb["text"], kappa(params))
    b2a = direction(emb["text"], emb["image"], kappa(params))
    return 0.5 * (a2b[0] + b2a[0])

  def metrics(emb, params):
    a2b = direction(emb["image"], emb["text"], kappa(params))
    b2a = direction(emb["text"], emb["image"], kappa(params))
    accuracy = [util.top1(np.asarray(d[2]), eye, ~eye) for d in (a2b, b2a)]
    return {"kl": 0.5 * (a2b[1] + b2a[1]), "accuracy": np.mean(accuracy)}

  return ref, metrics


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_lightclip_uniform_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(30)
  valid, _ = util.masks(rng)
  # step 600 of a 1000-step linear ramp to 0.2: ε = 0.12.
  ref, metrics = naive_lightclip(valid, 0.12)
  loss, got = util.check("lightclip", n, {"image": a, "text": t}, {"valid": valid}, ref, step=600,
                         tile_size=tile, key_mode=key_mode, epsilon_max=0.2, ramp_steps=1000, metrics_ref=metrics)
  assert 0 < float(got["kl"]) < float(loss) and 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_lightclip_similarity_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(31)
  valid, _ = util.masks(rng)
  eps = 0.2 * 0.5 * (1 - np.cos(np.pi * 0.25))
  ref, metrics = naive_lightclip(valid, eps, "similarity", 2.0)
  util.check("lightclip", n, {"image": a, "text": t}, {"valid": valid}, ref, step=250, tile_size=tile,
             key_mode=key_mode, epsilon_max=0.2, ramp_steps=1000, schedule="cosine", soft_neg_mode="similarity",
             similarity_temperature=2.0, metrics_ref=metrics)


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
  util.assert_close(metrics["kl"], light)  # one-hot targets: no target entropy


def test_lightclip_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  rng, a, t = util.pairs(33)
  valid, _ = util.masks(rng)
  ref, _ = naive_lightclip(valid, 0.0, scale=8.0)  # step 0: ε = 0
  util.check_init_scale("lightclip", {"image": a, "text": t}, {"valid": valid}, lambda emb: ref(emb, {}))
