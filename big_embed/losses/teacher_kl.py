"""Teacher soft labels: KL from a teacher's score distribution to the student's (LG-ANNA, arXiv 2506.07438).

Reconstructed (ALGORITHMS.md §10.2, [INF]): over the candidate set C_i of query i,

    y_i = softmax_{d∈C_i}(r(i, d) / teacher_temperature)        teacher (stop-gradient)
    p_i = softmax_{d∈C_i}(κ · q_i·k_d)                          student, κ = 1/temperature
    L = mean_i KL(y_i ‖ p_i) + hard_label_weight · mean_i [−log p_i(d⁺)]

In engine terms KL(y‖p) = E_y[a] − lse(a) − E_y[ℓ] + lse(ℓ) with a = r/τ_T (the `soft` statistic).

teacher_source="scores": C_i = {k_i} ∪ HN_i (the row's positive and its H hard negatives); the teacher's
  scores come as batch["teacher_scores"] [B, 1+H] (positive first), e.g. from a reranker. Per-row columns
  only; no in-batch negatives (their teacher scores are unknown).
teacher_source="embeddings": C_i = every in-batch key (all devices, tiled; `key_mode`) ∪ HN_i, with teacher
  scores r = cos(teacher_query_i, teacher_key_d) from batch["teacher_query"] [B, Dt], batch["teacher_key"]
  [B, Dt] and, with hard negatives, batch["teacher_hard_negatives"] [B, H, Dt] (a dense teacher retriever).

The false-negative filter of §10 for mined negatives lives in `infonce` (fn_filter, fn_scores="teacher").

Inputs: emb[query_tower] [B, D], emb[key_tower] [B, D], emb[hard_negative_tower] [B, H, D] (required for
"scores"); optional batch["valid"] [B], batch["hard_negative_valid"] [B, H]. Params: {} or {"logit_scale"}.
Metrics: loss, loss_kl, loss_ce, accuracy (the student's top-1 candidate is the positive), logit_scale.
Relation: a one-hot teacher gives `infonce`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce
from big_embed.ops import l2_normalize

SOURCES = ("scores", "embeddings")


def _default_config():
  return dict(
      query_tower="query",
      key_tower="key",
      hard_negative_tower="hard_negatives",
      **common.scale_fields(0.05, False),
      teacher_source="scores",        # "scores" | "embeddings"
      teacher_temperature=1.0,        # τ_T
      hard_label_weight=0.0,          # λ of the optional hard-label InfoNCE
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_key(cfg, "query_tower", "key_tower", "hard_negative_tower")
  common.check_scale(cfg)
  common.check_choice(cfg, "teacher_source", SOURCES)
  common.check_positive(cfg, "teacher_temperature")
  common.check_range(cfg, "hard_label_weight", lo=0.0)
  common.check_engine(cfg)


def _inputs(cfg, emb, batch) -> dict:
  q = common.array(emb, cfg.query_tower, "emb", ndim=2).astype(jnp.float32)
  b, d = q.shape
  out = {"query": q, "key": common.array(emb, cfg.key_tower, "emb", shape=(b, d)).astype(jnp.float32)}
  hn = common.array(emb, cfg.hard_negative_tower, "emb", shape=(b, None, d),
                    required=cfg.teacher_source == "scores")
  if hn is not None:
    out["hard_negatives"] = hn.astype(jnp.float32)
    hv = common.array(batch, "hard_negative_valid", "batch", shape=hn.shape[:2], required=False)
    out["hard_negative_valid"] = jnp.ones(hn.shape[:2], bool) if hv is None else hv.astype(bool)
  valid = common.array(batch, "valid", "batch", shape=(b,), required=False)
  if valid is not None:
    out["valid"] = valid.astype(bool)
  h = 0 if hn is None else hn.shape[1]
  if cfg.teacher_source == "scores":
    out["teacher_scores"] = common.array(batch, "teacher_scores", "batch", shape=(b, 1 + h)).astype(jnp.float32)
  else:
    tq = common.array(batch, "teacher_query", "batch", shape=(b, None))  # [B, Dt]
    dt = tq.shape[1]
    out["teacher_query"] = l2_normalize(tq)
    out["teacher_key"] = l2_normalize(common.array(batch, "teacher_key", "batch", shape=(b, dt)))
    if hn is not None:
      out["teacher_hard_negatives"] = l2_normalize(
          common.array(batch, "teacher_hard_negatives", "batch", shape=(b, h, dt)))
  return {k: lax.stop_gradient(v) if k.startswith("teacher") else v for k, v in out.items()}


def _local(cfg, s, r, shards):
  """Teacher-KL on the local shard `s` (inside shard_map)."""
  inv_tt = 1.0 / cfg.teacher_temperature
  layout = dict(valid=s.get("valid"), row_negatives=s.get("hard_negatives"),
                row_negatives_valid=s.get("hard_negative_valid"))
  if cfg.teacher_source == "scores":  # candidates: the row's own key and hard negatives, teacher logits given
    rows, cols, extra = infonce.retrieval_layout(s["query"], s["key"], shards=shards, in_batch=False, **layout)
    extra = extra._replace(a=s["teacher_scores"] * inv_tt)
  else:
    rows, cols, extra = infonce.retrieval_layout(
        s["query"], s["key"], shards=shards, query_targets=s["teacher_query"], key_targets=s["teacher_key"],
        row_negative_targets=s.get("teacher_hard_negatives"), **layout)
  stats = {"lse": engine.lse("pool"), "y": engine.soft("pool"), "pos": engine.total("pos"),
           "pos_count": engine.count("pos"), **engine.top1_stats()}
  st = engine.reduce_rows(stats, rows, cols, extra, scale=r["logit_scale"], target_scale=inv_tt,
                          tile_size=cfg.tile_size, key_mode=cfg.key_mode, shards=shards)
  ok = st["pos_count"] > 0
  z = lambda x: jnp.where(ok, x, 0.0)
  y = st["y"]
  kl = z((y["a"] - z(y["lse"])) - (y["s"] - z(st["lse"])))
  ce = z(st["lse"] - z(st["pos"] / jnp.maximum(st["pos_count"], 1.0)))
  kl_mean = engine.global_mean(kl, ok, shards)
  ce_mean = engine.global_mean(ce, ok, shards)
  loss = kl_mean + cfg.hard_label_weight * ce_mean
  return loss, {"loss": loss, "loss_kl": kl_mean, "loss_ce": ce_mean,
                "accuracy": engine.top1_accuracy(st, ok, shards)}


SPEC = common.register_engine_loss("teacher_kl", _default_config, _validate, _inputs, _local)
