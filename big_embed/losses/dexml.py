"""DEXML: decoupled softmax and soft top-k for extreme multi-label retrieval (Gupta et al., ICLR 2024, 2310.10636).

A dual encoder scores query i against a label pool L (label embeddings, sharded over the devices like the
batch; the pool is every device's labels unless key_mode="local"): ℓ_il = κ·q_i·e_l, κ = 1/temperature
(DEXML: 0.05 with normalised embeddings, 1 with raw dot products). Let P_i be the positives sampled for this
step (batch["positive_ids"]) and P*_i all of the query's positives (batch["all_positive_ids"]):

  mode="softmax" (multi-label InfoNCE baseline; non-sampled positives stay in the denominator):
      L = (1/B) Σ_i Σ_{p∈P_i} [ LSE_{l∈L} ℓ_il − ℓ_ip ]
  mode="decoupled" (the proposal; non-sampled positives are masked out of the pool):
      L = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} −log( e^{ℓ_ip} / (e^{ℓ_ip} + Σ_{l∈L∖P*_i} e^{ℓ_il}) )
        = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} softplus( LSE_{l∈L∖P*_i} ℓ_il − ℓ_ip )          (two engine passes)
  mode="topk" (soft top-k): t_i solves Σ_{l∈pool_i} σ(α(ℓ_il + t_i)) = k by bisection (topk_n_iter passes
      over the tiles, no gradient, bracket [−max ℓ − 10/α, −min ℓ + 10/α]); π_il = σ(α(ℓ_il + t_i));
      L = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} −log π_ip.  The gradient is the implicit one (∂t/∂ℓ_l = −v_l/Σv,
      v = α σ'): one differentiable Newton step t = t* − f(t*)/sg(Σv + ε) on f = Σσ(α(ℓ + t)) − k.
      k = topk_k ("fixed") or |P*_i| ("num_pos"); pool_i excludes padded labels and non-sampled positives.

B counts the rows that take part (valid, with a sampled positive and, for top-k, 0 < k_i < |pool_i|); the
others are dropped (metric "rows"). Label ids should be unique in the pool (a repeated id repeats a column).

Inputs:
  emb[query_tower]: [B, D]; emb[label_tower]: [L, D] (L divisible by the number of batch shards).
  batch["positive_ids"]: int [B, P] sampled positive label ids (-1 = padding); required.
  batch["all_positive_ids"]: int [B, P*] every positive (-1 = padding); default positive_ids.
  batch["label_ids"]: int [L] ids of the pool's labels; default the global column index 0..L-1.
  batch["label_valid"]: bool [L]; batch["valid"]: bool [B]. Optional.
  With in_batch_ids=True (image/text pairs whose batch["ids"] name classes): positive_ids = ids[:, None] and
  label_ids = ids, so every in-batch label sharing the row's id is a positive.
Params: {} or {"logit_scale"}. Metrics: loss, accuracy (top label is a positive), rows, logit_scale.
`sample_positives` draws P_i from P*_i (without replacement, ∝ relevance) for the input pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import infonce
from big_embed.losses import registry

MODES = ("decoupled", "softmax", "topk")
K_MODES = ("fixed", "num_pos")
_V_EPS = 1e-9


def _default_config():
  return dict(
      query_tower="query",
      label_tower="label",
      temperature=0.05,
      learnable_temperature=False,
      max_logit_scale=100.0,
      mode="decoupled",        # "decoupled" | "softmax" | "topk"
      topk_k=5,                # K of the soft top-k (applied to logits already divided by τ)
      topk_k_mode="fixed",     # "fixed" | "num_pos" (k_i = number of the row's positives)
      topk_alpha=2.0,
      topk_n_iter=32,
      in_batch_ids=False,      # True: the pool is the batch's own labels; batch["ids"] gives positives and label ids
      **common.engine_fields(),
  )


def _validate(cfg):
  for f in ("query_tower", "label_tower"):
    if not (isinstance(cfg[f], str) and cfg[f]):
      raise ValueError(f"config.loss.{f} must be a non-empty emb key, got {cfg[f]!r}")
  common.check_positive(cfg, "temperature")
  common.check_bool(cfg, "learnable_temperature")
  common.check_range(cfg, "max_logit_scale", lo=1.0)
  common.check_choice(cfg, "mode", MODES)
  common.check_range(cfg, "topk_k", lo=0, lo_open=True, integer=True)
  common.check_choice(cfg, "topk_k_mode", K_MODES)
  common.check_positive(cfg, "topk_alpha")
  common.check_range(cfg, "topk_n_iter", lo=1, integer=True)
  common.check_bool(cfg, "in_batch_ids")
  common.check_engine(cfg)


def sample_positives(rng, positive_ids, relevance=None, m: int = 1):
  """Draws m of each row's positives without replacement, with probability ∝ relevance (Gumbel top-k).

  positive_ids: int [B, P*] (-1 = padding); relevance: float [B, P*] >= 0 (default 1). Returns int [B, m],
  -1 where a row has fewer than m positives (DEXML clamps K per row).
  """
  if relevance is None:
    relevance = jnp.ones(positive_ids.shape, jnp.float32)
  live = (positive_ids >= 0) & (relevance > 0)
  logits = jnp.where(live, jnp.log(jnp.where(live, relevance, 1.0)), -jnp.inf)
  keys = logits + jax.random.gumbel(rng, positive_ids.shape)
  _, idx = lax.top_k(keys, m)  # [B, m]
  picked = jnp.take_along_axis(positive_ids, idx, axis=1)
  return jnp.where(jnp.take_along_axis(live, idx, axis=1), picked, -1)


def _inputs(cfg, emb, batch) -> dict:
  q = common.array(emb, cfg.query_tower, "emb", ndim=2).astype(jnp.float32)
  b, d = q.shape
  labels = common.array(emb, cfg.label_tower, "emb", shape=(None, d)).astype(jnp.float32)
  n = labels.shape[0]
  if cfg.in_batch_ids:  # row i's label is labels[i]; every label with row i's id is a positive of row i
    ids = common.array(batch, "ids", "batch", shape=(b,)).astype(jnp.int32)
    if n != b:
      raise ValueError(f"dexml: in_batch_ids needs one label per query, got {b} queries and {n} labels")
    batch = {**batch, "positive_ids": ids[:, None], "label_ids": ids}
  out = {"query": q, "labels": labels,
         "positive_ids": common.array(batch, "positive_ids", "batch", shape=(b, None)).astype(jnp.int32)}
  allp = common.array(batch, "all_positive_ids", "batch", shape=(b, None), required=False)
  out["all_positive_ids"] = out["positive_ids"] if allp is None else allp.astype(jnp.int32)
  for key, shape, dtype in (("label_ids", (n,), jnp.int32), ("label_valid", (n,), bool), ("valid", (b,), bool)):
    x = common.array(batch, key, "batch", shape=shape, required=False)
    if x is not None:
      out[key] = x.astype(dtype)
  if cfg.mode == "topk" and cfg.topk_k_mode == "fixed" and not 0 < cfg.topk_k < n:
    raise ValueError(f"config.loss.topk_k must be in (0, {n}) (the label pool size), got {cfg.topk_k}")
  return out


def _layout(cfg, s, shards):
  q, labels = s["query"], s["labels"]
  n = labels.shape[0]
  ids = s.get("label_ids")
  if ids is None:
    ids = shards.index() * n + jnp.arange(n, dtype=jnp.int32)
  valid = s.get("label_valid", jnp.ones((n,), bool))
  keys = engine.Keys(k=labels, index=jnp.full((n,), -1, jnp.int32), valid=valid, ids=ids)
  rows = engine.Rows(q=q, valid=s.get("valid", jnp.ones(q.shape[:1], bool)), ids=s["positive_ids"],
                     ignore_ids=None if cfg.mode == "softmax" else s["all_positive_ids"])
  return rows, keys


def _sigmoid_stats(alpha):
  return {"f": engine.total("pool", lambda t: jax.nn.sigmoid(alpha * (t.s + t.aux["t"][:, None]))),
          "v": engine.total("pool", lambda t: alpha * jax.nn.sigmoid(alpha * (t.s + t.aux["t"][:, None]))
                            * jax.nn.sigmoid(-alpha * (t.s + t.aux["t"][:, None])))}


def soft_topk_threshold(rows, keys, k, *, alpha, n_iter, scale, pass_kw):
  """Per-row t with Σ_pool σ(α(ℓ + t)) = k: bisection (no gradient) then one differentiable Newton step.

  k: [R] float. Returns (t [R], ok [R]: rows with 0 < k < |pool|).
  """
  sg = lax.stop_gradient
  rows_ng = jax.tree.map(sg, rows)
  keys_ng = jax.tree.map(sg, keys)
  pre = engine.reduce_rows({"max": engine.maximum("pool"), "min": engine.minimum("pool"),
                            "n": engine.count("pool")}, rows_ng, keys_ng, scale=sg(scale), **pass_kw)
  ok = (k > 0) & (pre["n"] > k)
  lo = jnp.where(ok, -pre["max"] - 10.0 / alpha, 0.0)
  hi = jnp.where(ok, -pre["min"] + 10.0 / alpha, 0.0)
  f_only = {"f": _sigmoid_stats(alpha)["f"]}

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    f = engine.reduce_rows(f_only, rows_ng._replace(aux={"t": mid}), keys_ng, scale=sg(scale), **pass_kw)["f"]
    below = f < k
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = lax.fori_loop(0, n_iter, step, (lo, hi))
  t_star = sg(0.5 * (lo + hi))
  st = engine.reduce_rows(_sigmoid_stats(alpha), rows._replace(aux={"t": t_star}), keys, scale=scale, **pass_kw)
  t = t_star - (st["f"] - k) / sg(st["v"] + _V_EPS)
  return jnp.where(ok, t, 0.0), ok


def dexml_loss_local(cfg, s: dict, scale, shards):
  """DEXML loss on the local shard `s` (inside shard_map). Returns (loss, metrics)."""
  rows, keys = _layout(cfg, s, shards)
  key_mode = cfg.key_mode
  if key_mode == "gather":  # several passes over the same keys: gather them once
    keys, key_mode = engine.gather_keys(keys, shards), "local"
  pass_kw = dict(tile_size=cfg.tile_size, key_mode=key_mode, shards=shards)
  base = {"pos_count": engine.count("pos"), "pos_max": engine.maximum("pos"), "neg_max": engine.maximum("neg")}
  z = lambda m, x: jnp.where(m, x, 0.0)
  if cfg.mode == "softmax":
    st = engine.reduce_rows({**base, "lse": engine.lse("pool"), "pos": engine.total("pos")}, rows, keys,
                            scale=scale, **pass_kw)
    ok = st["pos_count"] > 0
    per_row = z(ok, st["pos_count"] * z(ok, st["lse"]) - st["pos"])
  elif cfg.mode == "decoupled":
    st = engine.reduce_rows({**base, "lse_neg": engine.lse("neg")}, rows, keys, scale=scale, **pass_kw)
    ok = st["pos_count"] > 0
    off = jnp.where(ok, st["lse_neg"], -jnp.inf)
    loss_sum = engine.reduce_rows(
        {"l": engine.total("pos", lambda t: jax.nn.softplus(t.aux["off"][:, None] - t.s))},
        rows._replace(aux={"off": off}), keys, scale=scale, **pass_kw)["l"]
    per_row = z(ok, loss_sum / jnp.maximum(st["pos_count"], 1.0))
  else:
    if cfg.topk_k_mode == "fixed":
      k = jnp.full(rows.valid.shape, float(cfg.topk_k))
    else:
      k = jnp.sum(s["all_positive_ids"] >= 0, axis=1).astype(jnp.float32)
    st = engine.reduce_rows(base, rows, keys, scale=scale, **pass_kw)
    t, k_ok = soft_topk_threshold(rows, keys, k, alpha=cfg.topk_alpha, n_iter=cfg.topk_n_iter, scale=scale,
                                  pass_kw=pass_kw)
    ok = (st["pos_count"] > 0) & k_ok
    alpha = cfg.topk_alpha
    nll_sum = engine.reduce_rows(
        {"l": engine.total("pos", lambda tl: jax.nn.softplus(-alpha * (tl.s + tl.aux["t"][:, None])))},
        rows._replace(aux={"t": t}), keys, scale=scale, **pass_kw)["l"]
    per_row = z(ok, nll_sum / jnp.maximum(st["pos_count"], 1.0))
  loss = engine.global_mean(per_row, ok, shards)
  correct = (ok & (st["pos_max"] >= st["neg_max"])).astype(jnp.float32)
  return loss, {"loss": loss, "accuracy": engine.global_mean(correct, ok, shards),
                "rows": shards.psum(jnp.sum(ok, dtype=jnp.float32))}


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    del step
    scale = common.optional_scale(cfg, loss_params)
    loss, metrics = engine.shard(lambda s, r, shards: dexml_loss_local(cfg, s, r["scale"], shards), mesh,
                                 _inputs(cfg, emb, batch), {"scale": scale})
    return loss, {**metrics, "logit_scale": scale}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="dexml", build=_build, default_config=_default_config, init_params=infonce.init_params,
    clamp_params=common.clamp_scale, validate=_validate))
