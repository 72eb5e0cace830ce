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

Inputs: emb[towers[0]], emb[towers[1]] [B, D]; optional batch["valid"] [B]. Params: {"logit_scale": t}.
Metrics: loss, epsilon, accuracy, logit_scale. Relation: `softclip` (targets from intra-modal features).
"""

from __future__ import annotations

import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry

MODES = ("uniform", "similarity")
SCHEDULES = ("linear", "cosine", "step")


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(),
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


def lightclip_loss_local(a, b, *, shards, scale, eps, mode="uniform", similarity_temperature=1.0,
                         valid=None, tile_size=1024, key_mode="gather"):
  """Soft-target symmetric CE on local shards a, b [B_local, D] with negative mass eps (scalar)."""
  stats = {"lse": engine.lse("pool"), "pos": engine.total("pos"), "pos_count": engine.count("pos"),
           "neg_count": engine.count("neg"), "pos_max": engine.maximum("pos"), "neg_max": engine.maximum("neg")}
  if mode == "uniform":
    stats["neg_sum"] = engine.total("neg")
  else:
    stats["u"] = engine.soft("neg", lambda t: t.s / similarity_temperature)
  losses, accs = [], []
  for q, k in ((a, b), (b, a)):
    rows, cols, _ = engine.retrieval_layout(q, k, shards=shards, valid=valid)
    st = engine.reduce_rows(stats, rows, cols, scale=scale, tile_size=tile_size, key_mode=key_mode,
                            shards=shards)
    ok = st["pos_count"] > 0
    has_neg = st["neg_count"] > 0
    if mode == "uniform":
      neg_mean = st["neg_sum"] / jnp.maximum(st["neg_count"], 1.0)
    else:
      neg_mean = st["u"]["s"]
    e = jnp.where(has_neg, eps, 0.0)
    ce = jnp.where(ok, st["lse"] - (1.0 - e) * st["pos"] - e * neg_mean, 0.0)
    losses.append(engine.global_mean(ce, ok, shards))
    accs.append(engine.global_mean((ok & (st["pos_max"] >= st["neg_max"])).astype(jnp.float32), ok, shards))
  loss = 0.5 * (losses[0] + losses[1])
  return loss, {"loss": loss, "loss_a2b": losses[0], "loss_b2a": losses[1], "accuracy": 0.5 * (accs[0] + accs[1])}


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    scale = common.logit_scale(cfg, loss_params)
    inputs = common.pair_inputs(cfg, emb, batch, ids=False)
    eps = epsilon(step, cfg.epsilon_max, cfg.schedule, cfg.ramp_steps, cfg.step_stages)

    def local(s, r, shards):
      return lightclip_loss_local(
          s["a"], s["b"], shards=shards, scale=r["scale"], eps=r["eps"], mode=cfg.soft_neg_mode,
          similarity_temperature=cfg.similarity_temperature, valid=s.get("valid"), tile_size=cfg.tile_size,
          key_mode=cfg.key_mode)

    loss, metrics = engine.shard(local, mesh, inputs, {"scale": scale, "eps": eps})
    return loss, {**metrics, "epsilon": eps, "logit_scale": scale}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="lightclip", build=_build, default_config=_default_config, init_params=common.init_scale,
    clamp_params=common.clamp_scale, validate=_validate))
