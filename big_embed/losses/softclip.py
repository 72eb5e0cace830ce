"""SoftCLIP: softened targets from intra-modal self-similarity, plus neg-KL (Gao et al., AAAI 2024, 2303.17561).

Reconstructed from the abstract (ALGORITHMS.md §1, [INF]); α, τ_s and β are unverified (defaults 0.2, 0.1, 1).
Per direction (rows of one tower against the other tower's columns), with ℓ = κ·A Bᵀ:

    Q_i = softmax_j(S_ij / τ_s),  S_ij = cos(r_i, r_j)  intra-modal self-similarity of target features r
    Y_i = (1 − α)·onehot(i) + α·Q_i                      (stop-gradient)
    L_soft = mean_i KL(Y_i ‖ softmax_j ℓ_ij)
    L_neg  = mean_i KL(softmax_{j≠i}(S_ij/τ_s) ‖ softmax_{j≠i} ℓ_ij)     ("disentangled negatives": both
             distributions renormalised over the negatives, in log space; α cancels)
    L = ½ Σ_directions (L_soft + β·L_neg)

In engine terms: KL(Y‖p) = Σ_j Y log Y − [(1−α)ℓ_ii + α·E_Q[ℓ] − lse_i], and the neg-KL is
`E_Q̃[a] − lse(a)_neg − E_Q̃[ℓ] + lse(ℓ)_neg` with `a = S/τ_s` (the `soft` statistic over "neg").
A row without negatives (B_g = 1) contributes 0 to L_neg.

Target features per direction (`target_source_i2t` for towers[0] → towers[1], `target_source_t2i` for the
reverse): a tower name (its embeddings, stop-gradient) or "precomputed" (batch[precomputed_key_*], e.g.
pooled ROI / tag features [B, Dr]); all are L2-normalised here. Duplicates are *not* masked (§1.3).

Inputs: emb[towers[0]], emb[towers[1]] [B, D]; optional batch["valid"] [B]; batch[precomputed_key_*] [B, Dr]
when used. Params: {"logit_scale": t} (CLIP's). Metrics: loss, loss_soft, loss_neg, accuracy, logit_scale.
Relation: α = 0 and β = 0 give `clip` (its KL equals CLIP's cross-entropy).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import xlogy

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry

PRECOMPUTED = "precomputed"


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(),
      alpha=0.2,                       # weight of the soft part of the target (unverified)
      target_temperature=0.1,          # τ_s of the self-similarity softmax (unverified)
      beta=1.0,                        # weight of neg-KL (unverified)
      target_source_i2t="image",       # a tower name or "precomputed"
      target_source_t2i="text",
      precomputed_key_i2t="targets_i2t",
      precomputed_key_t2i="targets_t2i",
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)
  common.check_range(cfg, "alpha", lo=0.0, hi=1.0)
  common.check_positive(cfg, "target_temperature")
  common.check_range(cfg, "beta", lo=0.0)
  for field in ("target_source_i2t", "target_source_t2i"):
    common.check_choice(cfg, field, (*cfg.towers, PRECOMPUTED))
  common.check_engine(cfg)


def soft_stats() -> dict:
  return {"lse": engine.lse("pool"), "lse_neg": engine.lse("neg"), "q": engine.soft("pool"),
          "q_neg": engine.soft("neg"), "pos": engine.total("pos"), "pos_a": engine.total("pos", lambda t: t.a),
          "pos_count": engine.count("pos"), "pos_max": engine.maximum("pos"), "neg_max": engine.maximum("neg")}


def softclip_rows(st: dict, alpha: float):
  """Per-row (soft KL, neg KL, ok, correct) from `soft_stats` (one designated positive per row)."""
  ok = st["pos_count"] > 0
  has_neg = ok & jnp.isfinite(st["lse_neg"])
  z = lambda m, x: jnp.where(m, x, 0.0)
  q, qn = st["q"], st["q_neg"]
  q_lse = z(ok, q["lse"])
  # Target entropy part Σ_j Y log Y (constant): Y_ii = (1−α) + α Q_ii, Y_ij = α Q_ij off the positive.
  y_ii = (1.0 - alpha) + alpha * jnp.exp(z(ok, st["pos_a"]) - q_lse)
  rho = jnp.exp(jnp.where(has_neg, qn["lse"], -jnp.inf) - q_lse)  # Σ_{j∈neg} Q_ij
  ylogy = xlogy(y_ii, y_ii) + rho * xlogy(alpha, alpha) + alpha * rho * z(has_neg, qn["a"] - q_lse)
  cross = (1.0 - alpha) * st["pos"] + alpha * q["s"] - st["lse"]  # Σ_j Y_ij log p_ij
  kl_soft = z(ok, ylogy - z(ok, cross))
  kl_neg = z(has_neg, (qn["a"] - z(has_neg, qn["lse"])) - (qn["s"] - z(has_neg, st["lse_neg"])))
  correct = (ok & (st["pos_max"] >= st["neg_max"])).astype(jnp.float32)
  return kl_soft, kl_neg, ok, correct


def softclip_loss_local(a, b, ta, tb, *, shards, scale, alpha, target_temperature, beta, valid=None,
                        tile_size=1024, key_mode="gather"):
  """SoftCLIP on local shards: a, b [B_local, D]; ta / tb [B_local, Dr] targets of a→b / b→a (normalised)."""
  parts = []
  for q, k, t in ((a, b, ta), (b, a, tb)):
    rows, cols, _ = engine.retrieval_layout(q, k, shards=shards, valid=valid, query_targets=t, key_targets=t)
    st = engine.reduce_rows(soft_stats(), rows, cols, scale=scale, target_scale=1.0 / target_temperature,
                            tile_size=tile_size, key_mode=key_mode, shards=shards)
    kl_soft, kl_neg, ok, correct = softclip_rows(st, alpha)
    parts.append([engine.global_mean(x, ok, shards) for x in (kl_soft, kl_neg, correct)])
  soft, neg, acc = [0.5 * (x + y) for x, y in zip(*parts)]
  loss = soft + beta * neg
  return loss, {"loss": loss, "loss_soft": soft, "loss_neg": neg, "accuracy": acc}


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    del step
    scale = common.logit_scale(cfg, loss_params)
    inputs = common.pair_inputs(cfg, emb, batch, ids=False)
    b = inputs["a"].shape[0]
    for name, source, key in (("ta", cfg.target_source_i2t, cfg.precomputed_key_i2t),
                              ("tb", cfg.target_source_t2i, cfg.precomputed_key_t2i)):
      if source == PRECOMPUTED:
        feats = common.array(batch, key, "batch", shape=(b, None))
      else:
        feats = common.array(emb, source, "emb", shape=(b, None))
      inputs[name] = lax.stop_gradient(engine.l2_normalize(feats))

    def local(s, r, shards):
      return softclip_loss_local(
          s["a"], s["b"], s["ta"], s["tb"], shards=shards, scale=r["scale"], alpha=cfg.alpha,
          target_temperature=cfg.target_temperature, beta=cfg.beta, valid=s.get("valid"),
          tile_size=cfg.tile_size, key_mode=cfg.key_mode)

    loss, metrics = engine.shard(local, mesh, inputs, {"scale": scale})
    return loss, {**metrics, "logit_scale": scale}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="softclip", build=_build, default_config=_default_config, init_params=common.init_scale,
    clamp_params=common.clamp_scale, validate=_validate))
