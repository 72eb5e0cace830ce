"""SigLIP pairwise sigmoid loss (Zhai et al., ICCV 2023, arXiv 2303.15343; big_vision, open_clip SigLipLoss).

    ℓ_ij = κ·a_i·b_j + β,  z_ij = +1 for positives, −1 for negatives
    L = −(1/|B|) Σ_i Σ_j log σ(z_ij ℓ_ij) = (1/|B|) Σ_i [ Σ_{j∈P_i} softplus(−ℓ_ij) + Σ_{j∈N_i} softplus(ℓ_ij) ]

summed over the columns, averaged over the rows (one direction; the sum over all pairs is symmetric).
κ = exp(t) with t = log(1/temperature) learnable (init κ = 10) and bias β (init −10, against the ~B:1
negative:positive imbalance), no clamp (max_logit_scale = inf, as in big_vision); a fixed temperature or bias
is a constant, not a param. Tiled over the engine; `key_mode="ring"` passes the other tower's blocks round the
devices with `ppermute` (the paper's chunked "section 3.1" form) instead of all-gathering them.

Inputs: emb[towers[0]] (rows), emb[towers[1]] (columns): [B, D]; optional batch["valid"] [B], batch["ids"] [B]
(duplicates: "ignore" drops the pair from the sum, "positive" gives it the +1 label).
Params: {"logit_scale": t, "logit_bias": β} (each only when learnable). Metrics: loss, pos/neg parts, accuracy
(every positive of the row scores above every negative), logit_scale, logit_bias.
Relation: the per-pair (binary) counterpart of `clip`'s softmax; no global normalisation is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(0.1, True, max_logit_scale=float("inf")),
      bias_init=-10.0,
      learnable_bias=True,
      duplicates="ignore",      # same batch["ids"]: "ignore" | "positive"
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)
  common.check_range(cfg, "bias_init")
  common.check_bool(cfg, "learnable_bias")
  common.check_choice(cfg, "duplicates", infonce.DUPLICATES)
  common.check_engine(cfg)


def _init_params(cfg):
  bias = {"logit_bias": jnp.asarray(cfg.bias_init, jnp.float32)} if cfg.learnable_bias else {}
  return {**common.init_scale(cfg), **bias}


def _values(cfg, loss_params, step):
  del step
  bias = loss_params["logit_bias"] if cfg.learnable_bias else cfg.bias_init
  return {"logit_scale": common.logit_scale(cfg, loss_params), "logit_bias": jnp.asarray(bias, jnp.float32)}


def _inputs(cfg, emb, batch):
  return common.pair_inputs(cfg, emb, batch)


def _local(cfg, s, r, shards):
  """Sigmoid loss of the local rows a [B_local, D] against all columns b (inside shard_map)."""
  rows, cols, _ = infonce.retrieval_layout(s["a"], s["b"], shards=shards, valid=s.get("valid"), ids=s.get("ids"),
                                           duplicates=cfg.duplicates)
  stats = {"pos": engine.total("pos", lambda t: jax.nn.softplus(-t.s)),
           "neg": engine.total("neg", lambda t: jax.nn.softplus(t.s)),
           "pos_count": engine.count("pos"),
           "pos_min": engine.minimum("pos"), "neg_max": engine.maximum("neg")}
  st = engine.reduce_rows(stats, rows, cols, scale=r["logit_scale"], bias=r["logit_bias"], tile_size=cfg.tile_size,
                          key_mode=cfg.key_mode, shards=shards)
  ok = rows.valid
  pos = engine.global_mean(st["pos"], ok, shards)
  neg = engine.global_mean(st["neg"], ok, shards)
  # "accuracy": every positive scores above every negative (a threshold-free per-row check).
  correct = (ok & (st["pos_count"] > 0) & (st["pos_min"] > st["neg_max"])).astype(jnp.float32)
  loss = pos + neg
  return loss, {"loss": loss, "loss_pos": pos, "loss_neg": neg,
                "accuracy": engine.global_mean(correct, ok, shards)}


SPEC = common.register_engine_loss("siglip", _default_config, _validate, _inputs, _local, values=_values,
                                   init_params=_init_params)
