"""PEG progressive weighting (focal query weights; hardness-weighted negatives) vs naive full matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.losses import util
from tests.losses.test_infonce import inputs, logits_and_masks, naive_infonce, naive_metrics


def naive_peg(batch, mode, gamma=0.0, beta=0.0):
  valid = batch["valid"]

  def ref(emb, params):
    scale = jnp.exp(params["logit_scale"]) if "logit_scale" in params else 20.0
    logits, pos, neg = logits_and_masks(emb, batch, scale=scale)
    l, p, n = logits[valid], pos[valid], neg[valid]
    s_pos = jnp.sum(jnp.where(p, l, 0.0), axis=1)  # one positive per row here
    if mode == "hardness":
      sg = jax.lax.stop_gradient(l)
      w = n.sum(1, keepdims=True) * jax.nn.softmax(jnp.where(n, beta * sg, -jnp.inf), axis=1)
      w = jax.lax.stop_gradient(jnp.where(n, w, 0.0))
      denom = jnp.exp(s_pos) + jnp.sum(w * jnp.exp(jnp.where(n, l, 0.0)), axis=1)
      return jnp.mean(jnp.log(denom) - s_pos)
    nll = jax.nn.logsumexp(jnp.where(p | n, l, -jnp.inf), axis=1) - s_pos
    weight = jax.lax.stop_gradient((1 - jnp.exp(-nll)) ** gamma) if mode == "focal" else 1.0
    return jnp.mean(weight * nll)

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_peg_focal_matches_naive(n, key_mode, tile):
  emb, batch = inputs(50)
  # step 500 of a 1000-step ramp to 3: γ = 1.5.
  _, got = util.check("peg", n, emb, batch, naive_peg(batch, "focal", gamma=1.5), step=500, tile_size=tile,
                      key_mode=key_mode, peg_mode="focal", gamma_max=3.0, peg_ramp_steps=1000,
                      metrics_ref=naive_metrics(batch))
  assert 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_peg_hardness_matches_naive(n, key_mode, tile):
  emb, batch = inputs(51)
  params = {"logit_scale": jnp.float32(np.log(10.0))}  # learnable temperature: d/d logit_scale checked too
  util.check("peg", n, emb, batch, naive_peg(batch, "hardness", beta=0.3), params=params, step=2000,
             tile_size=tile, key_mode=key_mode, peg_mode="hardness", beta_max=0.3, peg_ramp_steps=1000,
             learnable_temperature=True, metrics_ref=naive_metrics(batch))


def test_peg_off_by_default_is_infonce():
  emb, batch = inputs(52)
  peg, metrics, _, _ = util.run("peg", 1, emb, batch, step=700, tile_size=5)
  plain, _, _, _ = util.run("infonce", 1, emb, batch, tile_size=5)
  util.assert_close(peg, plain)
  assert float(metrics["peg_gamma"]) > 0  # the ramp runs, the mode is "none"


def test_peg_zero_ramp_is_infonce():
  emb, batch = inputs(53)
  for mode in ("focal", "hardness"):
    peg, _, _, _ = util.run("peg", 1, emb, batch, step=0, tile_size=5, peg_mode=mode)
    plain, _, _, _ = util.run("infonce", 1, emb, batch, tile_size=5)
    util.assert_close(peg, plain)


@pytest.mark.parametrize("name", ["infonce", "peg"])
def test_learnable_init_params_give_the_configured_scale(name):
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  emb, batch = inputs(54)
  util.check_init_scale(name, emb, batch, lambda emb: naive_infonce(batch, scale=8.0)(emb, {}))
