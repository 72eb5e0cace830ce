"""SoftCLIP over the tiled engine vs a naive full-matrix implementation of ALGORITHMS.md §1.2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import xlogy

from tests.losses import util


def _norm(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def naive_softclip(valid, alpha=0.2, tau_s=0.1, beta=1.0, targets=None, scale=None):
  """(loss, metrics) references: full-matrix Y = (1−α)I + α softmax(S/τ_s), KL(Y‖p) + β KL(ỹ‖p̃) over the
  off-diagonal; valid pairs only; accuracy: the top-1 column of each direction's rows is the diagonal.

  targets: dict direction -> ("emb", key) or ("batch", array) for the self-similarity features.
  scale: a fixed κ (else exp(params["logit_scale"])).
  """
  targets = targets or {"i2t": ("emb", "image"), "t2i": ("emb", "text")}
  keep = np.flatnonzero(valid)

  def direction(x, y, r, scale):
    x, y, r = x[keep], y[keep], jax.lax.stop_gradient(_norm(r[keep]))
    n = len(keep)
    eye = jnp.eye(n, dtype=bool)
    logits = scale * x @ y.T
    q = jax.nn.softmax(r @ r.T / tau_s, axis=1)
    target = (1 - alpha) * jnp.eye(n) + alpha * q
    logp = jax.nn.log_softmax(logits, axis=1)
    kl_soft = jnp.sum(xlogy(target, target) - target * logp, axis=1)
    # Negatives only: both distributions renormalised off the diagonal.
    off_t = jax.nn.log_softmax(jnp.where(eye, -jnp.inf, r @ r.T / tau_s), axis=1)
    off_p = jax.nn.log_softmax(jnp.where(eye, -jnp.inf, logits), axis=1)
    kl_neg = jnp.sum(jnp.where(eye, 0.0, jnp.exp(off_t) * (off_t - off_p)), axis=1)
    return jnp.mean(kl_soft), jnp.mean(kl_neg)

  def feats(emb, spec):
    kind, value = spec
    return emb[value] if kind == "emb" else jnp.asarray(value)

  def kappa(params):
    return jnp.exp(params["logit_scale"]) if scale is None else scale

  def ref(emb, params):
    s1, n1 = direction(emb["image"], emb["text"], feats(emb, targets["i2t"]), kappa(params))
    s2, n2 = direction(emb["text"], emb["image"], feats(emb, targets["t2i"]), kappa(params))
    return 0.5 * (s1 + s2) + beta * 0.5 * (n1 + n2)

  def metrics(emb, params):
    logits = np.asarray(kappa(params) * emb["image"][keep] @ emb["text"][keep].T)
    eye = np.eye(len(keep), dtype=bool)
    return {"accuracy": 0.5 * (util.top1(logits, eye, ~eye) + util.top1(logits.T, eye, ~eye))}

  return ref, metrics


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_softclip_matches_naive(n, key_mode, tile):
  rng, a, t = util.pairs(20)
  valid, _ = util.masks(rng)
  ref, metrics = naive_softclip(valid)
  _, got = util.check("softclip", n, {"image": a, "text": t}, {"valid": valid}, ref, tile_size=tile,
                      key_mode=key_mode, metrics_ref=metrics)
  assert 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_softclip_precomputed_targets(n, key_mode, tile):
  rng, a, t = util.pairs(21)
  valid, _ = util.masks(rng)
  roi = rng.normal(size=(24, 5)).astype(np.float32)
  targets = {"i2t": ("batch", roi), "t2i": ("emb", "image")}
  params = {"logit_scale": jnp.float32(2.0)}
  util.check("softclip", n, {"image": a, "text": t}, {"valid": valid, "targets_i2t": roi},
             naive_softclip(valid, alpha=0.4, tau_s=0.3, beta=0.5, targets=targets)[0], params=params,
             tile_size=tile, key_mode=key_mode, alpha=0.4, target_temperature=0.3, beta=0.5,
             target_source_i2t="precomputed", target_source_t2i="image")


def test_softclip_alpha_zero_is_clip():
  rng, a, t = util.pairs(22)
  valid, _ = util.masks(rng)
  emb, batch = {"image": a, "text": t}, {"valid": valid}
  soft, metrics, _, _ = util.run("softclip", 1, emb, batch, tile_size=5, alpha=0.0, beta=0.0)
  clip, _, _, _ = util.run("clip", 1, emb, batch, tile_size=5)
  util.assert_close(soft, clip)
  assert float(metrics["loss_neg"]) > 0.0  # reported even when β = 0


def test_softclip_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  rng, a, t = util.pairs(23)
  valid, _ = util.masks(rng)
  ref, _ = naive_softclip(valid, scale=8.0)
  util.check_init_scale("softclip", {"image": a, "text": t}, {"valid": valid}, lambda emb: ref(emb, {}))
