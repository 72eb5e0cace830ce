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
when used. Params: {"logit_scale": t} (CLIP's fields and defaults). Metrics: loss, loss_soft, loss_neg,
accuracy (top-1 is the row's positive, averaged over the directions), logit_scale.
Relation: α = 0 and β = 0 give `clip` (its KL equals CLIP's cross-entropy).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import xlogy

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce
from big_embed.ops import l2_normalize

PRECOMPUTED = "precomputed"


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(0.07, True),
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
          "pos_count": engine.count("pos"), **engine.top1_stats()}


def softclip_rows(st: dict, alpha: float):
  """Per-row (soft KL, neg KL, ok) from `soft_stats` (one designated positive per row)."""
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
  return kl_soft, kl_neg, ok


def _inputs(cfg, emb, batch):
  inputs = common.pair_inputs(cfg, emb, batch, ids=False)
  b = inputs["a"].shape[0]
  for name, source, key in (("ta", cfg.target_source_i2t, cfg.precomputed_key_i2t),
                            ("tb", cfg.target_source_t2i, cfg.precomputed_key_t2i)):
    if source == PRECOMPUTED:
      feats = common.array(batch, key, "batch", shape=(b, None))
    else:
      feats = common.array(emb, source, "emb", shape=(b, None))
    inputs[name] = lax.stop_gradient(l2_normalize(feats))
  return inputs


def _local(cfg, s, r, shards):
  """SoftCLIP on the local shards: a, b [B_local, D]; ta / tb [B_local, Dr] targets of a→b / b→a (normalised)."""
  parts = []
  for st in infonce.both_directions(soft_stats(), s["a"], s["b"], shards=shards, valid=s.get("valid"),
                                      targets=(s["ta"], s["tb"]), scale=r["logit_scale"],
                                      target_scale=1.0 / cfg.target_temperature, tile_size=cfg.tile_size,
                                      key_mode=cfg.key_mode):
    kl_soft, kl_neg, ok = softclip_rows(st, cfg.alpha)
    parts.append([engine.global_mean(x, ok, shards) for x in (kl_soft, kl_neg)] +
                 [engine.top1_accuracy(st, ok, shards)])
  soft, neg, acc = [0.5 * (x + y) for x, y in zip(*parts)]
  loss = soft + cfg.beta * neg
  return loss, {"loss": loss, "loss_soft": soft, "loss_neg": neg, "accuracy": acc}


SPEC = common.register_engine_loss("softclip", _default_config, _validate, _inputs, _local)
