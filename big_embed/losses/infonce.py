"""InfoNCE for retrieval: multi-positive, hard negatives, false-negative filter (van den Oord et al. 2018).

    ℓ_ij = κ · q_i·k_j   (κ = 1/temperature, fixed unless learnable_temperature)
    L = mean_i [ log Σ_{j∈pool_i} exp ℓ_ij − mean_{p∈P_i} ℓ_ip ]           multi_positive="mean"
    L = mean_i [ log Σ_{j∈pool_i} exp ℓ_ij − log Σ_{p∈P_i} exp ℓ_ip ]      multi_positive="lse"

pool_i = the positives P_i (key i, plus keys sharing row i's id when duplicates="positive") and the negatives:
every other key of the global batch (all devices unless key_mode="local"), the hard negatives (per row, or
shared by all rows with hard_negatives_shared=True), minus ignored columns (duplicates="ignore", filtered
false negatives, padding). One direction, query → key; `clip` is the symmetric version.

False-negative filter (ALGORITHMS.md §10, LG-ANNA / NV-Retriever "TopK-PercPos"): a negative n of row i is
dropped iff r(i, n) >= r(i, +) − m_i, with
    fn_filter="absolute": m_i = fn_margin;  "relative": m_i = (1 − fn_ratio)·r(i, +);  "max": the larger.
fn_scores="student": r = the (stop-gradient) raw score q·k, applied to every negative column;
fn_scores="teacher": r = batch["teacher_scores"] [B, 1+H] (positive first, then the row's H hard negatives;
normalise them per query to the margin's scale), applied to the per-row hard negatives.

Inputs:
  emb[query_tower], emb[key_tower]: [B, D] (key i is query i's positive);
  emb[hard_negative_tower]: optional [B, H, D] hard negatives;
  batch["valid"] [B], batch["ids"] [B], batch["hard_negative_valid"] [B, H], batch["teacher_scores"]
  [B, 1+H]: optional.
Params: {} or {"logit_scale": t} when learnable_temperature. Metrics: loss, accuracy, negatives (mean count
per row), logit_scale. Relations: `peg` adds progressive weighting; `engine.info_nce` is the same loss as a
plain function; `teacher_kl` replaces the one-hot target by a teacher distribution.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry

FN_FILTERS = ("none", "absolute", "relative", "max")
FN_SCORES = ("student", "teacher")


def default_fields():
  return dict(
      query_tower="query",
      key_tower="key",
      hard_negative_tower="hard_negatives",  # optional emb entry [B, H, D]
      hard_negatives_shared=False,           # True: every row's hard negatives are negatives of all rows
      temperature=0.05,
      learnable_temperature=False,
      max_logit_scale=100.0,                 # clamp when learnable
      duplicates="ignore",                   # keys with the row's batch["ids"]: "ignore" | "positive"
      multi_positive="mean",                 # "mean" | "lse"
      fn_filter="none",                      # "none" | "absolute" | "relative" | "max"
      fn_margin=0.05,                        # m_abs
      fn_ratio=0.95,                         # ρ: relative margin (1 − ρ)·r(+)
      fn_scores="student",                   # "student" | "teacher" (batch["teacher_scores"])
      **common.engine_fields(),
  )


def validate_fields(cfg):
  for f in ("query_tower", "key_tower"):
    if not (isinstance(cfg[f], str) and cfg[f]):
      raise ValueError(f"config.loss.{f} must be a non-empty emb key, got {cfg[f]!r}")
  common.check_bool(cfg, "hard_negatives_shared")
  common.check_positive(cfg, "temperature")
  common.check_bool(cfg, "learnable_temperature")
  common.check_range(cfg, "max_logit_scale", lo=1.0)
  common.check_choice(cfg, "duplicates", engine.DUPLICATES)
  common.check_choice(cfg, "multi_positive", engine.MULTI_POSITIVE)
  common.check_choice(cfg, "fn_filter", FN_FILTERS)
  common.check_range(cfg, "fn_margin")
  common.check_range(cfg, "fn_ratio", lo=0.0, hi=1.0)
  common.check_choice(cfg, "fn_scores", FN_SCORES)
  if cfg.fn_scores == "teacher" and cfg.hard_negatives_shared and cfg.fn_filter != "none":
    raise ValueError("config.loss.fn_scores='teacher' filters per-row hard negatives; it needs "
                     "config.loss.hard_negatives_shared=False")
  common.check_engine(cfg)


def init_params(cfg):
  return {"logit_scale": jnp.log(1.0 / jnp.float32(cfg.temperature))} if cfg.learnable_temperature else {}


def inputs(cfg, emb, batch) -> dict:
  """The loss's arrays (batch-sharded), shape-checked."""
  q = common.array(emb, cfg.query_tower, "emb", ndim=2).astype(jnp.float32)
  b, d = q.shape
  out = {"query": q, "key": common.array(emb, cfg.key_tower, "emb", shape=(b, d)).astype(jnp.float32)}
  hn = common.array(emb, cfg.hard_negative_tower, "emb", shape=(b, None, d), required=False)
  if hn is not None:
    out["hard_negatives"] = hn.astype(jnp.float32)
    hv = common.array(batch, "hard_negative_valid", "batch", shape=hn.shape[:2], required=False)
    if hv is not None:
      out["hard_negative_valid"] = hv.astype(bool)
  for key, dtype in (("valid", bool), ("ids", jnp.int32)):
    x = common.array(batch, key, "batch", shape=(b,), required=False)
    if x is not None:
      out[key] = x.astype(dtype)
  if cfg.fn_filter != "none" and cfg.fn_scores == "teacher":
    if hn is None:
      raise ValueError(f"infonce: fn_scores='teacher' needs hard negatives emb[{cfg.hard_negative_tower!r}]")
    out["teacher_scores"] = common.array(batch, "teacher_scores", "batch",
                                         shape=(b, 1 + hn.shape[1])).astype(jnp.float32)
  return out


def fn_threshold(r_pos, mode: str, margin: float, ratio: float):
  """Per-row threshold r(+) − m: negatives scoring at or above it are false-negative suspects."""
  if mode == "absolute":
    m = jnp.full_like(r_pos, margin)
  elif mode == "relative":
    m = (1.0 - ratio) * r_pos
  else:
    m = jnp.maximum(margin, (1.0 - ratio) * r_pos)
  return r_pos - m


def layout(cfg, s: dict, shards):
  """Engine inputs (Rows, Keys, Extra) of the local shard `s` of `inputs`, with the filter applied."""
  q, k = s["query"], s["key"]
  hn = s.get("hard_negatives")
  hv = s.get("hard_negative_valid")
  shared = row = shared_valid = row_valid = None
  if hn is not None:
    if hv is None:
      hv = jnp.ones(hn.shape[:2], bool)
    if cfg.hard_negatives_shared:
      shared, shared_valid = hn.reshape(-1, hn.shape[-1]), hv.reshape(-1)
    else:
      row, row_valid = hn, hv
  threshold = None
  if cfg.fn_filter != "none":
    if cfg.fn_scores == "student":
      r_pos = lax.stop_gradient(jnp.sum(q * k, axis=-1))  # [B_local]
      threshold = fn_threshold(r_pos, cfg.fn_filter, cfg.fn_margin, cfg.fn_ratio)
    else:
      ts = s["teacher_scores"]  # [B_local, 1 + H]
      thr = fn_threshold(ts[:, 0], cfg.fn_filter, cfg.fn_margin, cfg.fn_ratio)
      row_valid = row_valid & (ts[:, 1:] < thr[:, None])
  rows, cols, extra = engine.retrieval_layout(
      q, k, shards=shards, valid=s.get("valid"), ids=s.get("ids"), duplicates=cfg.duplicates,
      shared_negatives=shared, shared_negatives_valid=shared_valid, row_negatives=row,
      row_negatives_valid=row_valid)
  return rows._replace(neg_threshold=threshold), cols, extra


def infonce_loss_local(cfg, s: dict, scale, shards):
  """InfoNCE on the local shard `s` (inside shard_map). Returns (loss, metrics)."""
  rows, cols, extra = layout(cfg, s, shards)
  stats = {**engine.contrastive_stats(cfg.multi_positive), "neg_count": engine.count("neg")}
  st = engine.reduce_rows(stats, rows, cols, extra, scale=scale, tile_size=cfg.tile_size,
                          key_mode=cfg.key_mode, shards=shards)
  nll, ok, correct = engine.contrastive_nll(st, cfg.multi_positive)
  loss = engine.global_mean(nll, ok, shards)
  return loss, {"loss": loss, "accuracy": engine.global_mean(correct, ok, shards),
                "negatives": engine.global_mean(st["neg_count"], ok, shards)}


def _default_config():
  return default_fields()


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    del step
    scale = common.optional_scale(cfg, loss_params)
    loss, metrics = engine.shard(lambda s, r, shards: infonce_loss_local(cfg, s, r["scale"], shards), mesh,
                                 inputs(cfg, emb, batch), {"scale": scale})
    return loss, {**metrics, "logit_scale": scale}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="infonce", build=_build, default_config=_default_config, init_params=init_params,
    clamp_params=common.clamp_scale, validate=validate_fields))
