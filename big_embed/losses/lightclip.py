"""LightCLIP instance-level loss: progressively softened negative labels (Nie et al. 2023, arXiv 2312.00674).

Reconstructed from the abstract (ALGORITHMS.md §8.2, [INF]). A symmetric soft cross-entropy whose target
moves mass ε_t from the positive to the negatives as training goes on:

    Y_t,i = (1 − ε_t)·onehot(i) + ε_t·u_i
      soft_neg_mode="uniform":     u_ij = 1/|N_i| on the row's negatives (1/(B_g − 1) without padding)
      soft_neg_mode="similarity":  u_i = softmax_{j∈N_i}(sg[ℓ_ij] / similarity_temperature)
    L = ½ Σ_directions mean_i [ lse_i − (1 − ε_t)·ℓ_ii − ε_t·E_{u_i}[ℓ_i] ]        (soft-CE; ε = 0 is CLIP)

    ε_t = epsilon_max · r(min(1, step / ramp_steps)),  r = linear: x | cosine: (1 − cos πx)/2 |
                                                           step: ⌊x·step_stages⌋ / step_stages

Rows without negatives use ε = 0. Only the instance-level term is here; the token-level matching and MLM
terms of the paper are model-side losses.

The loss value is the soft cross-entropy H(Y_t, p) = KL(Y_t ‖ p) + H(Y_t); the target entropy H(Y_t) does not
depend on the parameters (same gradients) but grows with ε_t, so the metric `kl` = KL(Y_t ‖ p) (0 for a perfect
fit) is logged too:
    H(Y_t,i) = −(1 − ε)·log(1 − ε) − ε·log ε − ε·Σ_j u_ij log u_ij,   Σ_j u_ij log u_ij = −log|N_i| (uniform)

Inputs: emb[towers[0]], emb[towers[1]] [B, D]; optional batch["valid"] [B]. Params: {"logit_scale": t} (CLIP's
fields and defaults). Metrics: loss (soft CE), loss per direction, kl, epsilon, accuracy (top-1 is the row's
positive), logit_scale. Relation: `softclip` (targets from intra-modal features).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.special import xlogy

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce

MODES = ("uniform", "similarity")
SCHEDULES = ("linear", "cosine", "step")


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(0.07, True),
      soft_neg_mode="uniform",       # "uniform" | "similarity"
      epsilon_max=0.1,               # final mass on the negatives (unverified; 0.1–0.2)
      schedule="linear",             # "linear" | "cosine" | "step"
      ramp_steps=10000,              # steps to reach epsilon_max
      step_stages=4,                 # number of equal jumps of the "step" schedule
      similarity_temperature=1.0,    # τ' of the "similarity" mode, applied to the (scaled) logits
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)
  common.check_choice(cfg, "soft_neg_mode", MODES)
  common.check_range(cfg, "epsilon_max", lo=0.0, hi=1.0)
  common.check_choice(cfg, "schedule", SCHEDULES)
  common.check_range(cfg, "ramp_steps", lo=1, integer=True)
  common.check_range(cfg, "step_stages", lo=1, integer=True)
  common.check_positive(cfg, "similarity_temperature")
  common.check_engine(cfg)


def epsilon(step, epsilon_max: float, schedule: str, ramp_steps: int, step_stages: int = 4):
  """ε_t of the progressive schedule (float32 scalar)."""
  x = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  if schedule == "linear":
    r = x
  elif schedule == "cosine":
    r = 0.5 * (1.0 - jnp.cos(jnp.pi * x))
  elif schedule == "step":
    r = jnp.floor(x * step_stages) / step_stages
  else:
    raise ValueError(f"config.loss.schedule must be one of {SCHEDULES}, got {schedule!r}")
  return epsilon_max * r


def _values(cfg, loss_params, step):
  return {"logit_scale": common.logit_scale(cfg, loss_params),
          "epsilon": epsilon(step, cfg.epsilon_max, cfg.schedule, cfg.ramp_steps, cfg.step_stages)}


def _inputs(cfg, emb, batch):
  return common.pair_inputs(cfg, emb, batch, ids=False)


def _local(cfg, s, r, shards):
  """Soft-target symmetric CE on the local shards a, b [B_local, D] with negative mass r["epsilon"]."""
  stats = {"lse": engine.lse("pool"), "pos": engine.total("pos"), "pos_count": engine.count("pos"),
           "neg_count": engine.count("neg"), **engine.top1_stats()}
  if cfg.soft_neg_mode == "uniform":
    stats["neg_sum"] = engine.total("neg")
  else:
    stats["u"] = engine.soft("neg", lambda t: t.s / cfg.similarity_temperature)
  losses, kls, accs = [], [], []
  for st in infonce.both_directions(stats, s["a"], s["b"], shards=shards, valid=s.get("valid"),
                                      scale=r["logit_scale"], tile_size=cfg.tile_size, key_mode=cfg.key_mode):
    ok = st["pos_count"] > 0
    has_neg = st["neg_count"] > 0
    if cfg.soft_neg_mode == "uniform":
      neg_mean = st["neg_sum"] / jnp.maximum(st["neg_count"], 1.0)
      u_log_u = -jnp.log(jnp.maximum(st["neg_count"], 1.0))  # Σ_j u_ij log u_ij
    else:
      neg_mean = st["u"]["s"]
      u_log_u = jnp.where(has_neg, st["u"]["a"] - jnp.where(has_neg, st["u"]["lse"], 0.0), 0.0)
    e = jnp.where(has_neg, r["epsilon"], 0.0)
    ce = jnp.where(ok, st["lse"] - (1.0 - e) * st["pos"] - e * neg_mean, 0.0)
    target_entropy = -xlogy(1.0 - e, 1.0 - e) - xlogy(e, e) - e * u_log_u
    losses.append(engine.global_mean(ce, ok, shards))
    kls.append(engine.global_mean(ce - target_entropy, ok, shards))
    accs.append(engine.top1_accuracy(st, ok, shards))
  mean = lambda x: 0.5 * (x[0] + x[1])
  loss = mean(losses)
  return loss, {"loss": loss, "loss_a2b": losses[0], "loss_b2a": losses[1], "kl": mean(kls), "accuracy": mean(accs)}


SPEC = common.register_engine_loss("lightclip", _default_config, _validate, _inputs, _local, values=_values)
