"""Distillation losses: DisCo embedding consistency, logit KD, SinKD, multi-teacher KD.

* `disco_mse` — DisCo (Gao et al., ECCV 2022, arXiv 2104.09124): squared error between the student's final
  (L2-normalised) embedding and a frozen teacher's, `Σ_{i,d} (t_id − s_id)²` (the reference's
  `reduction='sum'`; "mean" divides by B·D), summed over (student, teacher) pairs (DisCo distils both views),
  optionally added to a contrastive `inner` loss (DisCo's MoCo term).
* `logit_kd` — logit distillation with temperature T: forward KL(p_T‖p_S), reverse KL(p_S‖p_T),
  Jensen–Shannon, soft cross-entropy or MSE of z/T; the teacher is under `stop_gradient`; the T² factor
  (Hinton et al.) is optional and off by default, as in SinKD's code.
* `sinkd` — SinKD (Cui et al., LREC-COLING 2024, arXiv 2402.17110): `(1−α)·CE(z_S, y) + α·L_KD + β·L_sink`,
  with `L_sink = scale · Σ_ij P_ij W_ij` a batch-wise Sinkhorn distance: `W_ij = ‖p_S,i − p_T,j‖₁` over the
  B student and B teacher probability vectors (softmax at T_s = 2), `K = exp(−W/ε)` and 20 rounds of
  {row-normalise; column-normalise} (plain Sinkhorn–Knopp, unrolled through autodiff). The "log" mode runs
  the same iteration on log K with log-sum-exp, which never under/overflows (the plain one gives NaN once a
  whole row of exp(−W/ε) underflows, W/ε ≳ 87 in float32; with W ≤ 2 and ε = 0.1, W/ε ≤ 20 is safe); both
  agree wherever the plain one is finite. The registered loss rejects the plain mode when 2/ε > 87 (ε < 0.023),
  where it can underflow. Optional per-epoch temperature
  annealing of the KD term, `T_e = T + (1−T)·e/(E−1)`. This is the intended combination; the released
  training script only adds `β·L_sink` under a differently named loss key, so its "kd+sinkhorn" runs never
  used it.
* `repcon_kd` — Representation-Consolidation-style multi-teacher KD (Li et al. 2021, arXiv 2107.08039; the
  formula is a reconstruction, not checked against the paper): `Σ_k λ_k · T² · KL(p_{T_k} ‖ p_{h_k})`, one
  student head per teacher.

Inputs: student tensors come from `emb` (tower / head outputs); teacher tensors from `batch` (precomputed)
or `emb` (`teacher_from`). Logits are [B, C], embeddings [B, D]; everything is computed in float32.

Sharding: all of these are per-sample or (SinKD) need a [B_g, B_g] cost matrix, so they are written in plain
`jnp` on the global batch-sharded arrays and GSPMD inserts the collectives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from big_embed.errors import ConfigError
from big_embed.losses import common
from big_embed.losses import registry
from big_embed.ops import l2_normalize

KD_MODES = ("kl", "reverse_kl", "js", "soft_ce", "mse")
SINKHORN_MODES = ("plain", "log")
REDUCTIONS = ("sum", "mean")
SOURCES = ("batch", "emb")
# exp(−x) of float32 is a normal number for x <= −log(smallest normal) ≈ 87.3; the cost W is at most 2.
_PLAIN_SINKHORN_MIN_EPSILON = 2.0 / -float(np.log(np.finfo(np.float32).tiny))

# ----------------------------------------------------------------------------------------------------------
# Functions.


def kd_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature=1.0,
                  mode: str = "kl") -> jax.Array:
  """Per-row divergence between softmax(z_S/T) and softmax(z_T/T) (teacher under stop_gradient).

  Args:
    student_logits, teacher_logits: [B, C].
    temperature: T > 0, a float or a traced scalar.
    mode: "kl" KL(p_T‖p_S) | "reverse_kl" KL(p_S‖p_T) | "js" ½KL(p_T‖m)+½KL(p_S‖m), m = (p_T+p_S)/2 |
      "soft_ce" −Σ p_T log p_S | "mse" mean_c (z_S/T − z_T/T)².
  Returns:
    [B] float32 (no T² factor).
  """
  zs = student_logits.astype(jnp.float32) / temperature  # [B, C]
  zt = lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature  # [B, C]
  if mode == "mse":
    return jnp.mean(jnp.square(zs - zt), axis=-1)
  log_ps = jax.nn.log_softmax(zs, axis=-1)
  log_pt = jax.nn.log_softmax(zt, axis=-1)
  ps, pt = jnp.exp(log_ps), jnp.exp(log_pt)
  if mode == "kl":
    return jnp.sum(pt * (log_pt - log_ps), axis=-1)
  if mode == "reverse_kl":
    return jnp.sum(ps * (log_ps - log_pt), axis=-1)
  if mode == "js":
    log_m = jnp.logaddexp(log_ps, log_pt) - jnp.log(2.0)
    return 0.5 * jnp.sum(pt * (log_pt - log_m), axis=-1) + 0.5 * jnp.sum(ps * (log_ps - log_m), axis=-1)
  if mode == "soft_ce":
    return -jnp.sum(pt * log_ps, axis=-1)
  raise ValueError(f"kd mode must be one of {KD_MODES}, got {mode!r}")


def sinkhorn_plan(cost: jax.Array, epsilon: float = 0.1, iters: int = 20, mode: str = "plain") -> jax.Array:
  """`iters` rounds of {row-normalise; column-normalise} on K = exp(−cost/ε): [N, M] -> [N, M] plan.

  As in SinKD's code the last step normalises columns, so the total mass is about M, not 1.
  mode="plain" iterates on K (NaN once a row of K underflows); mode="log" on log K (always finite).
  """
  if mode == "plain":
    def body(_, k):
      k = k / jnp.sum(k, axis=1, keepdims=True)
      return k / jnp.sum(k, axis=0, keepdims=True)
    return lax.fori_loop(0, iters, body, jnp.exp(-cost / epsilon))
  if mode == "log":
    def log_body(_, log_k):
      log_k = log_k - jax.nn.logsumexp(log_k, axis=1, keepdims=True)
      return log_k - jax.nn.logsumexp(log_k, axis=0, keepdims=True)
    return jnp.exp(lax.fori_loop(0, iters, log_body, -cost / epsilon))
  raise ValueError(f"sinkhorn mode must be one of {SINKHORN_MODES}, got {mode!r}")


def sinkhorn_distance(student_logits: jax.Array, teacher_logits: jax.Array, temperature=2.0,
                      epsilon: float = 0.1, iters: int = 20, mode: str = "plain") -> jax.Array:
  """SinKD's batch-wise Sinkhorn distance `Σ_ij P_ij W_ij` (unscaled), teacher under stop_gradient.

  Args:
    student_logits, teacher_logits: [B, C].
  Returns:
    float32 scalar; W_ij = ‖softmax(z_S,i/T) − softmax(z_T,j/T)‖₁ ∈ [0, 2], P = sinkhorn_plan(W).
  """
  ps = jax.nn.softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)  # [B, C]
  pt = jax.nn.softmax(lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature, axis=-1)
  cost = jnp.sum(jnp.abs(ps[:, None, :] - pt[None, :, :]), axis=-1)  # [B, B]
  return jnp.sum(sinkhorn_plan(cost, epsilon, iters, mode) * cost)


def annealed_temperature(temperature: float, step, steps_per_epoch: int, epochs: int) -> jax.Array:
  """SinKD's `kd_anneal`: T_e = T + (1 − T)·e/(E − 1), e = min(step // steps_per_epoch, E − 1)."""
  if epochs <= 1:
    return jnp.asarray(temperature, jnp.float32)
  e = jnp.minimum(jnp.asarray(step, jnp.int32) // steps_per_epoch, epochs - 1).astype(jnp.float32)
  return temperature + (1.0 - temperature) * e / (epochs - 1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mean_i −log softmax(z_i)[y_i]; logits [B, C], int labels [B]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, labels.astype(jnp.int32)[:, None], axis=-1))


def embedding_mse(student: jax.Array, teacher: jax.Array, reduction: str = "sum") -> jax.Array:
  """DisCo's consistency term: Σ (or mean) over [B, D] of (teacher − student)², teacher stop-gradient."""
  sq = jnp.square(lax.stop_gradient(teacher.astype(jnp.float32)) - student.astype(jnp.float32))
  if reduction == "sum":
    return jnp.sum(sq)
  if reduction == "mean":
    return jnp.mean(sq)
  raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------
# Inputs of the registered losses.


def _pair(emb, batch, s_key, t_key, teacher_from, ndim=2):
  """(student emb[s_key], teacher <teacher_from>[t_key]) of equal shapes, each with `ndim` dims."""
  s = common.array(emb, s_key, "emb", ndim=ndim)
  table, where = common.source(emb, batch, teacher_from)
  return s, common.array(table, t_key, where, shape=s.shape)


# ----------------------------------------------------------------------------------------------------------
# disco_mse


def _disco_config():
  return dict(
      students=("student",),          # emb keys of student embeddings, each [B, D]
      teachers=("teacher",),          # matching teacher embeddings, each [B, D]
      teacher_from="batch",           # "batch" (precomputed) | "emb"
      normalize_teacher=True,         # L2-normalise the teacher embedding (DisCo's are normalised)
      reduction="sum",                # "sum" (DisCo's code) | "mean" (over B·D)
      weight=1.0,
      inner=None,                     # optional contrastive loss config added as is (DisCo: MoCo)
  )


def _disco_validate(cfg):
  common.check_same_length(cfg, "students", "teachers")
  common.check_choice(cfg, "teacher_from", SOURCES)
  common.check_choice(cfg, "reduction", REDUCTIONS)
  common.check_bool(cfg, "normalize_teacher")
  common.check_range(cfg, "weight", lo=0.0)


def _disco_build(cfg, mesh, task=None):
  inner_fn = registry.build_inner(cfg, mesh, task, optional=True)

  def loss_fn(emb, batch, loss_params, step):
    metrics, mse = {}, 0.0
    for s_key, t_key in zip(cfg.students, cfg.teachers):
      s, t = _pair(emb, batch, s_key, t_key, cfg.teacher_from)
      if cfg.normalize_teacher:
        t = l2_normalize(t)
      term = embedding_mse(s, t, cfg.reduction)
      metrics[f"mse/{s_key}"] = term
      mse = mse + term
    loss = cfg.weight * mse
    if inner_fn is not None:
      inner_loss, inner_metrics = inner_fn(emb, batch, loss_params, step)
      metrics.update({f"inner/{k}": v for k, v in inner_metrics.items()})
      loss = loss + inner_loss
    return loss, {"loss": loss, "mse": mse, **metrics}

  return loss_fn


# ----------------------------------------------------------------------------------------------------------
# logit_kd


def _kd_config():
  return dict(
      student="logits",            # emb key, [B, C]
      teacher="teacher_logits",    # key in `teacher_from`, [B, C]
      teacher_from="batch",
      mode="kl",                   # one of KD_MODES
      temperature=1.0,
      t2_factor=False,             # multiply by T² (Hinton); SinKD's code does not
      weight=1.0,
  )


def _kd_validate(cfg):
  common.check_choice(cfg, "mode", KD_MODES)
  common.check_choice(cfg, "teacher_from", SOURCES)
  common.check_positive(cfg, "temperature")
  common.check_bool(cfg, "t2_factor")
  common.check_range(cfg, "weight", lo=0.0)


def _kd_build(cfg, mesh, task=None):
  del mesh, task

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    zs, zt = _pair(emb, batch, cfg.student, cfg.teacher, cfg.teacher_from)
    t = float(cfg.temperature)
    kd = jnp.mean(kd_divergence(zs, zt, t, cfg.mode)) * (t * t if cfg.t2_factor else 1.0)
    loss = cfg.weight * kd
    agree = jnp.mean((jnp.argmax(zs, -1) == jnp.argmax(zt, -1)).astype(jnp.float32))
    return loss, {"loss": loss, "kd": kd, "teacher_agreement": agree}

  return loss_fn


# ----------------------------------------------------------------------------------------------------------
# sinkd


def _sinkd_config():
  return dict(
      student="logits",
      teacher="teacher_logits",
      teacher_from="batch",
      label_key="label",           # batch[label_key]: int [B]; not read when alpha == 1
      alpha=0.9,                   # (1−α)·CE + α·KD
      beta=0.8,                    # β·L_sink
      kd_mode="soft_ce",           # SinKD's GLUE L_KD (no T²); "mse" for regression (STS-B)
      kd_temperature=2.0,
      t2_factor=False,
      kd_anneal=False,             # T_e = T + (1−T)·e/(E−1), e = epoch index
      anneal_epochs=1,             # E
      steps_per_epoch=1,
      sinkhorn_temperature=2.0,    # T_s, hard-coded to 2 in the reference
      sinkhorn_epsilon=0.1,
      sinkhorn_iters=20,
      sinkhorn_scale=1e-3,         # 1e-3 for GLUE/BERT, 8e-4 for T0 / GPT-Neo
      sinkhorn_mode="plain",       # "plain" (the reference) | "log" (numerically safe)
  )


def _sinkd_validate(cfg):
  common.check_choice(cfg, "kd_mode", KD_MODES)
  common.check_choice(cfg, "teacher_from", SOURCES)
  common.check_choice(cfg, "sinkhorn_mode", SINKHORN_MODES)
  for field in ("kd_temperature", "sinkhorn_temperature", "sinkhorn_epsilon"):
    common.check_positive(cfg, field)
  for field in ("sinkhorn_iters", "anneal_epochs", "steps_per_epoch"):
    common.check_range(cfg, field, lo=1, integer=True)
  for field in ("beta", "sinkhorn_scale"):
    common.check_range(cfg, field, lo=0.0)
  common.check_range(cfg, "alpha", lo=0.0, hi=1.0)
  common.check_bool(cfg, "t2_factor")
  common.check_bool(cfg, "kd_anneal")
  if cfg.sinkhorn_mode == "plain" and cfg.sinkhorn_epsilon < _PLAIN_SINKHORN_MIN_EPSILON:
    raise ConfigError(
        f"{registry.field_path('sinkhorn_epsilon')}={cfg.sinkhorn_epsilon} with sinkhorn_mode='plain' can underflow "
        f"exp(-W/ε) to 0 in float32 (W/ε up to 2/ε = {2 / cfg.sinkhorn_epsilon:.0f} > 87) and give NaN; use "
        f"{registry.field_path('sinkhorn_mode')}='log' or sinkhorn_epsilon >= {_PLAIN_SINKHORN_MIN_EPSILON:.3f}")


def _sinkd_build(cfg, mesh, task=None):
  del mesh, task
  alpha, beta = float(cfg.alpha), float(cfg.beta)

  def loss_fn(emb, batch, loss_params, step):
    del loss_params
    zs, zt = _pair(emb, batch, cfg.student, cfg.teacher, cfg.teacher_from)
    if cfg.kd_anneal:
      t = annealed_temperature(float(cfg.kd_temperature), step, int(cfg.steps_per_epoch),
                               int(cfg.anneal_epochs))
    else:
      t = jnp.asarray(cfg.kd_temperature, jnp.float32)
    kd = jnp.mean(kd_divergence(zs, zt, t, cfg.kd_mode))
    if cfg.t2_factor:
      kd = kd * t * t
    sink = cfg.sinkhorn_scale * sinkhorn_distance(
        zs, zt, cfg.sinkhorn_temperature, cfg.sinkhorn_epsilon, int(cfg.sinkhorn_iters), cfg.sinkhorn_mode)
    loss = alpha * kd + beta * sink
    metrics = {"kd": kd, "sinkhorn": sink, "kd_temperature": t}
    if alpha < 1:
      labels = common.array(batch, cfg.label_key, "batch", shape=zs.shape[:1])
      ce = cross_entropy(zs, labels)
      loss = loss + (1.0 - alpha) * ce
      metrics["ce"] = ce
      metrics["accuracy"] = jnp.mean((jnp.argmax(zs, -1) == labels).astype(jnp.float32))
    return loss, {"loss": loss, **metrics}

  return loss_fn


# ----------------------------------------------------------------------------------------------------------
# repcon_kd


def _repcon_config():
  return dict(
      students=("head_0", "head_generalist"),   # emb keys of the student heads' logits, each [B, C_k]
      teachers=("teacher_0", "teacher_generalist"),
      teacher_from="batch",
      weights=(1.0, 1.0),                        # λ_k
      mode="kl",
      temperature=2.0,
      t2_factor=True,
  )


def _repcon_validate(cfg):
  common.check_same_length(cfg, "students", "teachers")
  if len(cfg.weights) != len(cfg.students) or any(not w >= 0 for w in cfg.weights):
    raise ConfigError(f"{registry.field_path('weights')} must be {len(cfg.students)} values >= 0 (one per "
                      f"teacher), got {tuple(cfg.weights)}")
  common.check_choice(cfg, "mode", KD_MODES)
  common.check_choice(cfg, "teacher_from", SOURCES)
  common.check_positive(cfg, "temperature")
  common.check_bool(cfg, "t2_factor")


def _repcon_build(cfg, mesh, task=None):
  del mesh, task
  t = float(cfg.temperature)
  factor = t * t if cfg.t2_factor else 1.0

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    loss, metrics = 0.0, {}
    for s_key, t_key, w in zip(cfg.students, cfg.teachers, cfg.weights):
      zs, zt = _pair(emb, batch, s_key, t_key, cfg.teacher_from)
      kd = factor * jnp.mean(kd_divergence(zs, zt, t, cfg.mode))
      metrics[f"kd/{s_key}"] = kd
      loss = loss + float(w) * kd
    loss = jnp.asarray(loss, jnp.float32)
    return loss, {"loss": loss, **metrics}

  return loss_fn


DISCO_SPEC = registry.wrapper("disco_mse", _disco_build, _disco_config, _disco_validate,
                              task_types=("retrieval",), optional=True)
KD_SPEC = registry.register(registry.LossSpec(
    name="logit_kd", build=_kd_build, default_config=_kd_config, validate=_kd_validate))
SINKD_SPEC = registry.register(registry.LossSpec(
    name="sinkd", build=_sinkd_build, default_config=_sinkd_config, validate=_sinkd_validate))
REPCON_SPEC = registry.register(registry.LossSpec(
    name="repcon_kd", build=_repcon_build, default_config=_repcon_config, validate=_repcon_validate))
