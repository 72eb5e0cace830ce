"""SigLIP pairwise sigmoid loss (Zhai et al., ICCV 2023, arXiv 2303.15343; big_vision, open_clip SigLipLoss).

    ℓ_ij = exp(t')·a_i·b_j + β,  z_ij = +1 for positives, −1 for negatives
    L = −(1/|B|) Σ_i Σ_j log σ(z_ij ℓ_ij) = (1/|B|) Σ_i [ Σ_{j∈P_i} softplus(−ℓ_ij) + Σ_{j∈N_i} softplus(ℓ_ij) ]

summed over the columns, averaged over the rows (one direction; the sum over all pairs is symmetric).
Learnable scale t' (init log 10) and bias β (init −10, against the ~B:1 negative:positive imbalance), no clamp.
Tiled over the engine; `key_mode="ring"` passes the other tower's blocks round the devices with `ppermute`
(the paper's chunked "section 3.1" form) instead of all-gathering them.

Inputs: emb[towers[0]] (rows), emb[towers[1]] (columns): [B, D]; optional batch["valid"] [B], batch["ids"] [B]
(duplicates: "ignore" drops the pair from the sum, "positive" gives it the +1 label).
Params: {"logit_scale": t', "logit_bias": β}. Metrics: loss, pos/neg parts, accuracy, logit_scale, logit_bias.
Relation: the per-pair (binary) counterpart of `clip`'s softmax; no global normalisation is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry


def _default_config():
  return dict(
      towers=("image", "text"),
      scale_init=10.0,          # exp(t') at init: t' = log 10
      bias_init=-10.0,
      learnable_scale=True,
      learnable_bias=True,
      duplicates="ignore",      # same batch["ids"]: "ignore" | "positive"
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_positive(cfg, "scale_init")
  common.check_range(cfg, "bias_init")
  common.check_bool(cfg, "learnable_scale")
  common.check_bool(cfg, "learnable_bias")
  common.check_choice(cfg, "duplicates", engine.DUPLICATES)
  common.check_engine(cfg)


def _init_params(cfg):
  return {"logit_scale": jnp.asarray(np.log(cfg.scale_init), jnp.float32),
          "logit_bias": jnp.asarray(cfg.bias_init, jnp.float32)}


def siglip_loss_local(a, b, *, shards, scale, bias, valid=None, ids=None, duplicates="ignore",
                      tile_size=1024, key_mode="gather"):
  """Sigmoid loss of local rows a [B_local, D] against all columns b (inside shard_map)."""
  rows, cols, _ = engine.retrieval_layout(a, b, shards=shards, valid=valid, ids=ids, duplicates=duplicates)
  stats = {"pos": engine.total("pos", lambda t: jax.nn.softplus(-t.s)),
           "neg": engine.total("neg", lambda t: jax.nn.softplus(t.s)),
           "pos_count": engine.count("pos"),
           "pos_min": engine.minimum("pos"), "neg_max": engine.maximum("neg")}
  st = engine.reduce_rows(stats, rows, cols, scale=scale, bias=bias, tile_size=tile_size, key_mode=key_mode,
                          shards=shards)
  ok = rows.valid
  pos = engine.global_mean(st["pos"], ok, shards)
  neg = engine.global_mean(st["neg"], ok, shards)
  # "accuracy": every positive scores above every negative (a threshold-free per-row check).
  correct = (ok & (st["pos_count"] > 0) & (st["pos_min"] > st["neg_max"])).astype(jnp.float32)
  loss = pos + neg
  return loss, {"loss": loss, "loss_pos": pos, "loss_neg": neg,
                "accuracy": engine.global_mean(correct, ok, shards)}


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    del step
    t = jnp.asarray(loss_params["logit_scale"], jnp.float32)
    bias = jnp.asarray(loss_params["logit_bias"], jnp.float32)
    t = t if cfg.learnable_scale else jax.lax.stop_gradient(t)
    bias = bias if cfg.learnable_bias else jax.lax.stop_gradient(bias)
    inputs = common.pair_inputs(cfg, emb, batch)

    def local(s, r, shards):
      return siglip_loss_local(s["a"], s["b"], shards=shards, scale=r["scale"], bias=r["bias"],
                               valid=s.get("valid"), ids=s.get("ids"), duplicates=cfg.duplicates,
                               tile_size=cfg.tile_size, key_mode=cfg.key_mode)

    loss, metrics = engine.shard(local, mesh, inputs, {"scale": jnp.exp(t), "bias": bias})
    return loss, {**metrics, "logit_scale": jnp.exp(t), "logit_bias": bias}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="siglip", build=_build, default_config=_default_config, init_params=_init_params,
    validate=_validate))
