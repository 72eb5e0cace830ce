"""InfoNCE (van den Oord et al. 2018) on the similarity engine: the retrieval layout, the InfoNCE row reductions,
the one InfoNCE function every InfoNCE-based loss calls, and the registered loss `infonce`.

    ℓ_ij = κ · q_i·k_j   (κ = 1/temperature, fixed unless learnable_temperature)
    L = mean_i [ log Σ_{j∈pool_i} exp ℓ_ij − mean_{p∈P_i} ℓ_ip ]           multi_positive="mean"
    L = mean_i [ log Σ_{j∈pool_i} exp ℓ_ij − log Σ_{p∈P_i} exp ℓ_ip ]      multi_positive="lse"

pool_i = the positives P_i (key i, plus keys sharing row i's id when duplicates="positive") and the negatives:
every other key of the global batch (all devices unless key_mode="local"), the hard negatives (per row, or
shared by all rows with hard_negatives_shared=True), minus ignored columns (duplicates="ignore", pairs marked in
batch["key_mask"], filtered false negatives, padding). One direction, query → key; `clip` is the symmetric
version, `peg` adds progressive weighting, `hybrid` uses `info_nce` for Piccolo2's retrieval and classification.

False-negative filter (ALGORITHMS.md §10, LG-ANNA / NV-Retriever "TopK-PercPos"): a negative n of row i is
dropped iff r(i, n) >= r(i, +) − m_i, with
    fn_filter="absolute": m_i = fn_margin;  "relative": m_i = (1 − fn_ratio)·r(i, +);  "max": the larger.
fn_scores="student": r = the (stop-gradient) raw score q·k, applied to every negative column;
fn_scores="teacher": r = batch["teacher_scores"] [B, 1+H] (positive first, then the row's H hard negatives;
normalise them per query to the margin's scale), applied to the per-row hard negatives.

Inputs of `infonce`:
  emb[query_tower], emb[key_tower]: [B, D] (key i is query i's positive);
  emb[hard_negative_tower]: optional [B, H, D] hard negatives;
  batch["valid"] [B], batch["ids"] [B], batch["key_mask"] bool [B, B] (True: key j is not a negative of query i),
  batch["hard_negative_valid"] [B, H], batch["teacher_scores"] [B, 1+H]: optional.
Params: {} or {"logit_scale": t} when learnable_temperature. Metrics: loss, accuracy (top-1 is a positive),
negatives (mean count per row), rows, logit_scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.errors import ConfigError
from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry
from big_embed.losses import symmetric
from big_embed.ops import l2_normalize

DUPLICATES = ("ignore", "positive")
MULTI_POSITIVE = ("mean", "lse")
FN_FILTERS = ("none", "absolute", "relative", "max")
FN_SCORES = ("student", "teacher")


# ------------------------------------------------------------------------------------------------
# Layout: (queries, keys, negatives, ids) -> engine rows and columns.


def _bool(x, shape, what):
  x = jnp.ones(shape, bool) if x is None else jnp.asarray(x).astype(bool)
  if x.shape != shape:
    raise ValueError(f"{what} must be {list(shape)}, got {x.shape}")
  return x


def retrieval_layout(queries, keys, *, shards: engine.Shards, valid=None, ids=None, duplicates: str = "ignore",
                     key_mask=None, in_batch: bool = True, shared_negatives=None, shared_negatives_valid=None,
                     row_negatives=None, row_negatives_valid=None, neg_threshold=None, query_targets=None,
                     key_targets=None, row_negative_targets=None):
  """Engine inputs for "row i's positive is key i" with optional ids, masks and hard negatives (local shards).

  Args:
    queries, keys: [B, d] local shards; key i is the designated positive of query i.
    valid: [B] bool (a padded pair is neither a row nor a column).
    ids: [B] int item ids of the pairs (-1 = no id). Another key with the row's id is a duplicate: ignored
      (`duplicates="ignore"`) or an extra positive (`"positive"`).
    key_mask: [B, B_g] bool, these rows of a global [B_g, B_g] mask by pair index: True = key j is not a negative
      of row i (known to be related); the designated positive stays a positive.
    in_batch: False: key i is a column of row i only (a per-row candidate set, no in-batch negatives).
    shared_negatives: [M, d] negatives of every row (columns like the keys), valid [M].
    row_negatives: [B, H, d] negatives of their own row only (extra columns), valid [B, H].
    neg_threshold: [B] float: negatives whose raw score q·k reaches it are ignored (false-negative filter).
    query_targets, key_targets, row_negative_targets: [B, da], [B, da], [B, H, da] target features.
  Returns:
    (Rows, Keys or None, Extra or None) for `engine.reduce_rows`.
  """
  if duplicates not in DUPLICATES:
    raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
  b, d = queries.shape
  if keys.shape != (b, d):
    raise ValueError(f"keys must have the queries' shape {(b, d)}, got {keys.shape}")
  valid = _bool(valid, (b,), "valid")
  q, k = queries.astype(jnp.float32), keys.astype(jnp.float32)
  rows = engine.Rows(q=q, valid=valid, qa=query_targets,
                     neg_threshold=None if neg_threshold is None else jnp.asarray(neg_threshold, jnp.float32))
  cols = None
  extra = []  # (k [B, h, d], valid [B, h], pos [B, h], target features [B, h, da] or None)
  if in_batch:
    index = shards.index() * b + jnp.arange(b, dtype=jnp.int32)  # [B] global pair index
    rows = rows._replace(pos_index=index)
    key_ids = None
    if ids is not None:
      key_ids = jnp.asarray(ids).astype(jnp.int32)
      if key_ids.shape != (b,):
        raise ValueError(f"ids must be [{b}] (one id per pair), got {key_ids.shape}")
      rows = rows._replace(**{"ids" if duplicates == "positive" else "ignore_ids": key_ids[:, None]})
    if key_mask is not None:
      if key_mask.ndim != 2 or key_mask.shape[0] != b:
        raise ValueError(f"key_mask must be [{b}, B_global], got {key_mask.shape}")
      rows = rows._replace(key_mask=jnp.asarray(key_mask).astype(bool))
    cols = engine.Keys(k=k, index=index, valid=valid, ids=key_ids, ka=key_targets)
    if shared_negatives is not None:
      m = shared_negatives.shape[0]
      if shared_negatives.ndim != 2 or shared_negatives.shape[1] != d:
        raise ValueError(f"shared negatives must be [M, {d}], got {shared_negatives.shape}")
      if key_targets is not None:
        raise ValueError("target features with shared negatives are not supported")
      none = jnp.full((m,), -1, jnp.int32)
      cols = engine.Keys(k=jnp.concatenate([k, shared_negatives.astype(jnp.float32)]),  # [B + M, d]
                         index=jnp.concatenate([index, none]),
                         valid=jnp.concatenate([valid, _bool(shared_negatives_valid, (m,), "shared negatives' valid")]),
                         ids=None if key_ids is None else jnp.concatenate([key_ids, none]))
  else:
    if ids is not None or key_mask is not None or shared_negatives is not None:
      raise ValueError("in_batch=False (per-row columns only) takes no ids, key_mask or shared negatives")
    ka = None if key_targets is None else key_targets[:, None]
    extra.append((k[:, None], valid[:, None], jnp.ones((b, 1), bool), ka))
  if row_negatives is not None:
    if row_negatives.ndim != 3 or row_negatives.shape[0] != b or row_negatives.shape[2] != d:
      raise ValueError(f"row negatives must be [{b}, H, {d}], got {row_negatives.shape}")
    h = row_negatives.shape[1]
    rvalid = _bool(row_negatives_valid, (b, h), "row negatives' valid mask")
    extra.append((row_negatives.astype(jnp.float32), rvalid, jnp.zeros((b, h), bool), row_negative_targets))
  if not extra:
    return rows, cols, None
  parts = list(zip(*extra))
  ka = None if any(x is None for x in parts[3]) else jnp.concatenate(parts[3], axis=1)
  return rows, cols, engine.Extra(k=jnp.concatenate(parts[0], axis=1), valid=jnp.concatenate(parts[1], axis=1),
                                  pos=jnp.concatenate(parts[2], axis=1), ka=ka)


# ------------------------------------------------------------------------------------------------
# Row reductions and the InfoNCE function.


def contrastive_stats(multi_positive: str = "mean") -> dict[str, engine.Stat]:
  """Statistics of InfoNCE rows: positive and negative LSEs, positive sums and counts, negative counts, top-1."""
  if multi_positive not in MULTI_POSITIVE:
    raise ValueError(f"multi_positive must be one of {MULTI_POSITIVE}, got {multi_positive!r}")
  return {"pos_lse": engine.lse("pos"), "neg_lse": engine.lse("neg"), "pos_sum": engine.total("pos"),
          "pos_count": engine.count("pos"), "neg_count": engine.count("neg"), **engine.top1_stats()}


def contrastive_nll(st: dict, multi_positive: str = "mean"):
  """Per-row InfoNCE from `contrastive_stats`.

  nll_i = lse_i − mean_{p∈P_i} s_ip ("mean": every positive a target, SupCon-out style; one positive: the
  usual −log softmax) or lse_i − log Σ_{p∈P_i} exp(s_ip) ("lse": −log of the positives' total probability),
  with lse_i the pool's LSE. Computed as logaddexp(lse_pos − target, lse_neg − target) so that a dominant
  positive (e.g. τ = 0.01) does not cancel two large, nearly equal numbers: with one positive this is
  softplus(lse_neg − s_ip), exact in float32.
  Returns nll [R] (0 on rows without a positive) and ok [R] bool (the row has a positive).
  """
  ok = st["pos_count"] > 0
  if multi_positive == "mean":
    target = st["pos_sum"] / jnp.maximum(st["pos_count"], 1.0)
  else:
    target = st["pos_lse"]
  target = jnp.where(ok, target, 0.0)
  pos_part = jnp.where(ok, st["pos_lse"], 0.0) - target  # >= 0; exactly 0 with one positive
  nll = jnp.where(ok, jnp.logaddexp(pos_part, st["neg_lse"] - target), 0.0)
  return nll, ok


def summary(per_row, ok, st: dict, shards: engine.Shards):
  """(loss, metrics) of per-row losses [R] over the rows `ok`: loss, accuracy, negatives, rows (global)."""
  loss = engine.global_mean(per_row, ok, shards)
  return loss, {"loss": loss, "accuracy": engine.top1_accuracy(st, ok, shards),
                "negatives": engine.global_mean(st["neg_count"], ok, shards),
                "rows": shards.psum(jnp.sum(ok, dtype=jnp.float32))}


def info_nce_local(queries, keys, *, shards: engine.Shards = engine.Shards(), scale=1.0, multi_positive="mean",
                   tile_size: int = 1024, key_mode: str = "gather", **layout):
  """InfoNCE of local queries against keys (all devices' keys unless key_mode="local"); see `info_nce`.

  `layout`: the keyword arguments of `retrieval_layout` (valid, ids, duplicates, key_mask, in_batch, negatives,
  neg_threshold). Call inside `shard_map` (pass `shards`) or on plain arrays (`Shards()`). Returns (loss,
  metrics {loss, accuracy, negatives, rows}).
  """
  rows, cols, extra = retrieval_layout(queries, keys, shards=shards, **layout)
  st = engine.reduce_rows(contrastive_stats(multi_positive), rows, cols, extra, scale=scale, tile_size=tile_size,
                          key_mode=key_mode, shards=shards)
  nll, ok = contrastive_nll(st, multi_positive)
  return summary(nll, ok, st, shards)


def both_directions(stats: dict[str, engine.Stat], a, b, *, shards: engine.Shards = engine.Shards(), scale=1.0,
                    target_scale=1.0, tile_size: int = 1024, key_mode: str = "gather", targets=None, key_mask=None,
                    key_mask_t=None, **layout) -> list[dict]:
  """`stats` of a's rows against b's columns and of b's rows against a's: [a→b results [B_local], b→a results].

  One pass over the tiles of `a bᵀ` (`symmetric.reduce_both`) where the key mode allows, else `reduce_rows` per
  direction (the ring over several shards).
  Args:
    a, b: the local pairs [B_local, D]. targets: None or (ta, tb), the target features of a→b (rows and keys) and
      of b→a. key_mask [B_local, B_global]: a→b's (see `retrieval_layout`); key_mask_t: b→a's, its transpose.
    layout: valid, ids, duplicates (as `retrieval_layout`). The rest as `engine.reduce_rows`.
  """
  ta, tb = (None, None) if targets is None else targets
  kw = dict(scale=scale, target_scale=target_scale, tile_size=tile_size, key_mode=key_mode, shards=shards)
  if not symmetric.one_pass(key_mode, shards):
    out = []
    for q, k, t, m in ((a, b, ta, key_mask), (b, a, tb, key_mask_t)):
      rows, cols, _ = retrieval_layout(q, k, shards=shards, key_mask=m, query_targets=t, key_targets=t, **layout)
      out.append(engine.reduce_rows(stats, rows, cols, **kw))
    return out
  rows, cols, _ = retrieval_layout(a, b, shards=shards, key_mask=key_mask, query_targets=ta, key_targets=ta, **layout)
  return list(symmetric.reduce_both(stats, rows, cols, col_targets=None if tb is None else (tb, tb), **kw))


def symmetric_info_nce_local(a, b, *, shards: engine.Shards = engine.Shards(), scale=1.0, multi_positive="mean",
                             tile_size: int = 1024, key_mode: str = "gather", **layout):
  """InfoNCE of a against b and of b against a (CLIP's two directions): [(loss, metrics) a→b, (loss, metrics) b→a].

  With one positive per row (no `duplicates="positive"` ids) and a one-pass key mode: the negatives' LSEs of both
  directions with their hand-written backward (`symmetric.lse_both`); else every `contrastive_stats` statistic
  (`both_directions`). `layout`: valid, ids, duplicates, key_mask, key_mask_t (as `both_directions`).
  """
  kw = dict(scale=scale, tile_size=tile_size, key_mode=key_mode, shards=shards)
  if not symmetric.one_pass(key_mode, shards) or (layout.get("duplicates") == "positive" and
                                                   layout.get("ids") is not None):
    both = both_directions(contrastive_stats(multi_positive), a, b, **kw, **layout)
    return [summary(*contrastive_nll(st, multi_positive), st, shards) for st in both]
  layout.pop("key_mask_t", None)  # the transpose of key_mask
  rows, cols, _ = retrieval_layout(a, b, shards=shards, **layout)
  pos = scale * jnp.sum(rows.q * cols.k, axis=1)  # [B_local] the pairs' logits, the same in both directions
  out = []
  for neg in symmetric.lse_both(rows, cols, **kw):
    ok = rows.valid  # a valid pair is its rows' one positive
    nll = jnp.where(ok, jax.nn.softplus(neg["lse"] - pos), 0.0)  # = contrastive_nll with one positive
    out.append(summary(nll, ok, {"pos_max": pos, "neg_max": neg["max"], "neg_count": neg["count"]}, shards))
  return out


def info_nce(queries, keys, hard_negatives=None, ids=None, *, scale=None, temperature=None, mesh=None,
             key_mode: str = "local", tile_size: int = 1024, multi_positive: str = "mean", normalize: bool = False,
             **layout):
  """InfoNCE over (queries, keys, optional hard negatives, optional ids) on global arrays, tiled.

  `L = mean_i [ log Σ_{j∈pool_i} exp(ℓ_ij) − ℓ_{i,i} ]`, ℓ = scale · q·k, where pool_i = every key column
  (the in-batch positives of the other rows and all `hard_negatives`, shared by every row) plus row i's own
  `row_negatives`; van den Oord et al. 2018, as used by Piccolo2's retrieval branch (arXiv 2405.06932 §3.3:
  τ = 0.01, in-batch + shared hard negatives, no cross-device gathering, no symmetric term).

  Args:
    queries: [B, D]. keys: [B, D]; keys[i] is the positive of queries[i].
    hard_negatives: optional [M, D] (e.g. Piccolo2's [B·k, D]) negatives of every row.
    ids: optional int [B] pair ids (see `retrieval_layout`'s `duplicates`).
    scale or temperature: logit scale (= 1/temperature); a float or a scalar (differentiable) array.
    mesh: None computes on whatever device holds the arrays (one shard). With a mesh the batch dim of every
      array is split over the mesh's batch axes and `key_mode` says which keys a shard sees: "local" (its own
      keys and hard negatives only: Piccolo2's per-device negatives), "gather" (every shard's) or "ring".
    tile_size: key columns per tile (memory O(B_local × tile_size)).
    normalize: L2-normalise every embedding first (cosine similarities).
    layout: other `retrieval_layout` arguments: valid [B], hard_negatives_valid [M] (its
      `shared_negatives_valid`), row_negatives [B, H, D] with row_negatives_valid [B, H], key_mask [B, B],
      duplicates, in_batch.
  Returns:
    (loss, metrics): loss averaged over the rows that have a positive; metrics {loss, accuracy, negatives, rows}.
  """
  if (scale is None) == (temperature is None):
    raise ValueError("info_nce: give exactly one of scale, temperature")
  if temperature is not None:
    if isinstance(temperature, (int, float)) and not temperature > 0:
      raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    scale = 1.0 / jnp.asarray(temperature, jnp.float32)
  prep = l2_normalize if normalize else (lambda x: jnp.asarray(x).astype(jnp.float32))
  layout["shared_negatives"] = hard_negatives
  layout["shared_negatives_valid"] = layout.pop("hard_negatives_valid", None)
  layout["ids"] = ids
  embeddings = ("shared_negatives", "row_negatives")
  sharded = {"queries": prep(queries), "keys": prep(keys)}
  sharded.update({k: prep(v) if k in embeddings else jnp.asarray(v) for k, v in layout.items()
                  if v is not None and not isinstance(v, (str, bool))})
  static = {k: v for k, v in layout.items() if isinstance(v, (str, bool))}

  def local(s, r, shards):
    arrays = {k: v for k, v in s.items() if k not in ("queries", "keys")}
    return info_nce_local(s["queries"], s["keys"], shards=shards, scale=r["scale"], multi_positive=multi_positive,
                          tile_size=tile_size, key_mode=key_mode, **arrays, **static)

  return engine.shard(local, mesh, sharded, {"scale": jnp.asarray(scale, jnp.float32)})


# ------------------------------------------------------------------------------------------------
# The registered loss.


def default_fields():
  return dict(
      query_tower="query",
      key_tower="key",
      hard_negative_tower="hard_negatives",  # optional emb entry [B, H, D]
      hard_negatives_shared=False,           # True: every row's hard negatives are negatives of all rows
      **common.scale_fields(0.05, False),
      duplicates="ignore",                   # keys with the row's batch["ids"]: "ignore" | "positive"
      multi_positive="mean",                 # "mean" | "lse"
      fn_filter="none",                      # "none" | "absolute" | "relative" | "max"
      fn_margin=0.05,                        # m_abs
      fn_ratio=0.95,                         # ρ: relative margin (1 − ρ)·r(+)
      fn_scores="student",                   # "student" | "teacher" (batch["teacher_scores"])
      **common.engine_fields(),
  )


def validate_fields(cfg):
  common.check_key(cfg, "query_tower", "key_tower", "hard_negative_tower")
  common.check_bool(cfg, "hard_negatives_shared")
  common.check_scale(cfg)
  common.check_choice(cfg, "duplicates", DUPLICATES)
  common.check_choice(cfg, "multi_positive", MULTI_POSITIVE)
  common.check_choice(cfg, "fn_filter", FN_FILTERS)
  common.check_range(cfg, "fn_margin")
  common.check_range(cfg, "fn_ratio", lo=0.0, hi=1.0)
  common.check_choice(cfg, "fn_scores", FN_SCORES)
  if cfg.fn_scores == "teacher" and cfg.hard_negatives_shared and cfg.fn_filter != "none":
    raise ConfigError(f"{registry.field_path('fn_scores')}='teacher' filters per-row hard negatives; it needs "
                      f"{registry.field_path('hard_negatives_shared')}=False")
  common.check_engine(cfg)


def inputs(cfg, emb, batch) -> dict:
  """The loss's arrays (batch-sharded), shape-checked."""
  q = common.array(emb, cfg.query_tower, "emb", ndim=2).astype(jnp.float32)
  b, d = q.shape
  out = {"query": q, "key": common.array(emb, cfg.key_tower, "emb", shape=(b, d)).astype(jnp.float32)}
  hn = common.array(emb, cfg.hard_negative_tower, "emb", shape=(b, None, d), required=False)
  if hn is not None:
    out["hard_negatives"] = hn.astype(jnp.float32)
    hv = common.array(batch, "hard_negative_valid", "batch", shape=hn.shape[:2], required=False)
    out["hard_negative_valid"] = jnp.ones(hn.shape[:2], bool) if hv is None else hv.astype(bool)
  for key, shape, dtype in (("valid", (b,), bool), ("ids", (b,), jnp.int32), ("key_mask", (b, b), bool)):
    x = common.array(batch, key, "batch", shape=shape, required=False)
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


def layout_kwargs(cfg, s: dict) -> dict:
  """`retrieval_layout` arguments of the local shard `s` of `inputs`, with the false-negative filter applied."""
  kw = dict(valid=s.get("valid"), ids=s.get("ids"), duplicates=cfg.duplicates, key_mask=s.get("key_mask"))
  hn, hv = s.get("hard_negatives"), s.get("hard_negative_valid")
  if cfg.fn_filter != "none" and cfg.fn_scores == "student":
    r_pos = lax.stop_gradient(jnp.sum(s["query"] * s["key"], axis=-1))  # [B_local]
    kw["neg_threshold"] = fn_threshold(r_pos, cfg.fn_filter, cfg.fn_margin, cfg.fn_ratio)
  elif cfg.fn_filter != "none":
    ts = s["teacher_scores"]  # [B_local, 1 + H]
    hv = hv & (ts[:, 1:] < fn_threshold(ts[:, 0], cfg.fn_filter, cfg.fn_margin, cfg.fn_ratio)[:, None])
  if hn is not None and cfg.hard_negatives_shared:
    kw.update(shared_negatives=hn.reshape(-1, hn.shape[-1]), shared_negatives_valid=hv.reshape(-1))
  elif hn is not None:
    kw.update(row_negatives=hn, row_negatives_valid=hv)
  return kw


def _local(cfg, s, r, shards):
  return info_nce_local(s["query"], s["key"], shards=shards, scale=r["logit_scale"],
                        multi_positive=cfg.multi_positive, tile_size=cfg.tile_size, key_mode=cfg.key_mode,
                        **layout_kwargs(cfg, s))


SPEC = common.register_engine_loss("infonce", default_fields, validate_fields, inputs, _local)
