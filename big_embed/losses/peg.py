"""PEG: InfoNCE with very many in-batch negatives and progressive sample weighting (Wu et al. 2023, 2311.11691).

The recipe side of PEG (80k in-batch negatives, 5 hard negatives per query) is `infonce` over the engine
(gathered passages, hard negatives shared or per row). The progressive weighting is reconstructed from the
abstract (ALGORITHMS.md §4.3, [INF]) as a switchable family, off by default (`peg_mode="none"` is `infonce`):

  (A) peg_mode="focal":    L = mean_i w_i·nll_i,  w_i = sg[(1 − p_i)^γ(t)],  p_i = exp(−nll_i)
  (B) peg_mode="hardness": the denominator becomes Σ_{p∈P_i} e^{ℓ_ip} + Σ_{j∈N_i} ω_ij e^{ℓ_ij},
                           ω_ij = sg[|N_i| · softmax_{j∈N_i}(β(t)·ℓ_ij)], so that
                           log Σ_j ω_ij e^{ℓ_ij} = log|N_i| + LSE_j(ℓ_ij + β sg[ℓ_ij]) − sg[LSE_j(β ℓ_ij)]
                           (two online LSE statistics, one pass)

with γ(t) = gamma_max·min(1, step/peg_ramp_steps) and β(t) = beta_max·min(1, step/peg_ramp_steps); γ = 0 or
β = 0 give plain InfoNCE. Which one (if either) is the paper's is unverified.

Inputs, params: as `infonce` (plus the PEG fields). Metrics: infonce's (loss, accuracy, negatives, rows,
logit_scale) plus peg_gamma / peg_beta.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce

MODES = ("none", "focal", "hardness")


def _default_config():
  return dict(
      **infonce.default_fields(),
      peg_mode="none",       # "none" | "focal" | "hardness"
      gamma_max=2.0,         # focal exponent at the end of the ramp
      beta_max=0.5,          # hardness sharpness (on the scaled logits) at the end of the ramp
      peg_ramp_steps=10000,
  )


def _validate(cfg):
  infonce.validate_fields(cfg)
  common.check_choice(cfg, "peg_mode", MODES)
  common.check_range(cfg, "gamma_max", lo=0.0)
  common.check_range(cfg, "beta_max", lo=0.0)
  common.check_range(cfg, "peg_ramp_steps", lo=1, integer=True)


def ramp(step, peak: float, ramp_steps: int):
  return peak * jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)


def _logaddexp(x, y):
  """log(e^x + e^y) with -inf allowed in either (finite gradients)."""
  m = lax.stop_gradient(jnp.maximum(x, y))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  return m + jnp.log(jnp.exp(x - m) + jnp.exp(y - m))


def _values(cfg, loss_params, step):
  return {"logit_scale": common.logit_scale(cfg, loss_params),
          "peg_gamma": ramp(step, cfg.gamma_max, cfg.peg_ramp_steps),
          "peg_beta": ramp(step, cfg.beta_max, cfg.peg_ramp_steps)}


def _local(cfg, s, r, shards):
  """PEG-weighted InfoNCE on the local shard `s` of `infonce.inputs` (inside shard_map)."""
  rows, cols, extra = infonce.retrieval_layout(s["query"], s["key"], shards=shards, **infonce.layout_kwargs(cfg, s))
  stats = infonce.contrastive_stats(cfg.multi_positive)
  if cfg.peg_mode == "hardness":
    rows = rows._replace(aux={"beta": jnp.broadcast_to(r["peg_beta"], rows.valid.shape)})
    stats.update(w_lse=engine.lse("neg", lambda t: t.s + t.aux["beta"][:, None] * lax.stop_gradient(t.s)),
                 b_lse=engine.lse("neg", lambda t: t.aux["beta"][:, None] * lax.stop_gradient(t.s)))
  st = engine.reduce_rows(stats, rows, cols, extra, scale=r["logit_scale"], tile_size=cfg.tile_size,
                          key_mode=cfg.key_mode, shards=shards)
  nll, ok = infonce.contrastive_nll(st, cfg.multi_positive)
  if cfg.peg_mode == "hardness":
    has_neg = ok & (st["neg_count"] > 0)
    z = lambda m, x: jnp.where(m, x, 0.0)
    w_neg = jnp.where(has_neg, jnp.log(jnp.maximum(st["neg_count"], 1.0)) + z(has_neg, st["w_lse"])
                      - lax.stop_gradient(z(has_neg, st["b_lse"])), -jnp.inf)
    pos_lse = z(ok, st["pos_lse"])
    target = pos_lse if cfg.multi_positive == "lse" else st["pos_sum"] / jnp.maximum(st["pos_count"], 1.0)
    nll = jnp.where(ok, _logaddexp(pos_lse, w_neg) - target, 0.0)
  if cfg.peg_mode == "focal":
    p = jnp.exp(-lax.stop_gradient(nll))
    nll = nll * jnp.power(jnp.maximum(1.0 - p, 0.0), r["peg_gamma"])
  return infonce.summary(nll, ok, st, shards)


SPEC = common.register_engine_loss("peg", _default_config, _validate, infonce.inputs, _local, values=_values)
