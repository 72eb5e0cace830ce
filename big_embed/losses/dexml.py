"""DEXML: decoupled softmax and soft top-k for extreme multi-label retrieval (Gupta et al., ICLR 2024, 2310.10636).

A dual encoder scores query i against a label pool L (label embeddings, sharded over the devices like the
batch; the pool is every device's labels unless key_mode="local"): ℓ_il = κ·q_i·e_l, κ = 1/temperature
(DEXML: 0.05 with normalised embeddings, 1 with raw dot products). Let P_i be the positives sampled for this
step (batch["positive_ids"]), w_ip their weights (batch["positive_weights"], DEXML's `loss_weighted` relevance
values; default 1) and P*_i all of the query's positives (batch["all_positive_ids"]):

  mode="softmax" (multi-label InfoNCE baseline; non-sampled positives stay in the denominator):
      L = (1/B) Σ_i Σ_{p∈P_i} w_ip [ LSE_{l∈L} ℓ_il − ℓ_ip ]
  mode="decoupled" (the proposal; non-sampled positives are masked out of the pool):
      L = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} −w_ip log( e^{ℓ_ip} / (e^{ℓ_ip} + Σ_{l∈L∖P*_i} e^{ℓ_il}) )
        = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} w_ip softplus( LSE_{l∈L∖P*_i} ℓ_il − ℓ_ip )     (two engine passes)
  mode="topk" (soft top-k): t_i solves Σ_{l∈pool_i} σ(α(ℓ_il + t_i)) = k_i by bisection (topk_n_iter passes
      over the tiles, no gradient, bracket [−max ℓ − 10/α, −min ℓ + 10/α]), refined by a Newton step;
      π_il = σ(α(ℓ_il + t_i)); L = (1/B) Σ_i (1/|P_i|) Σ_{p∈P_i} −w_ip log π_ip. The gradient is the implicit
      one (∂t/∂ℓ_l = −v_l/Σv, v = α σ'), through one differentiable Newton step t = t₁ − f(t₁)/sg(Σv(t₁)) at
      the refined threshold t₁. f − k is summed as (#{x > 0} − k) + Σ (σ(x) − [x > 0]), x = α(ℓ + t), so that
      saturated sigmoids (large α) do not drown the root in float32 rounding of Σσ ≈ k.
      k_i = topk_k ("fixed"), |P*_i| ("num_pos") or batch["topk_k"][i] ("per_row"); pool_i excludes padded
      labels and non-sampled positives.
  mode="bce" (the one-vs-all baseline DEXML's decoupled softmax is compared to), over the same pool:
      L = (1/B) Σ_i (1/|pool_i|) Σ_{l∈pool_i} w_il [ softplus(ℓ_il) − y_il ℓ_il ],  y_il = 1 for l ∈ P_i, else 0
      (w_il = 1 off the positives; softplus(ℓ) − ℓ = softplus(−ℓ)); with all pools of one size, the mean over
      rows and labels (ALGORITHMS.md §2.4).

B counts the rows that take part (valid, with a sampled positive and, for top-k, 0 < k_i < |pool_i|); the
others are dropped (metric "rows"). Label ids should be unique in the pool (a repeated id repeats a column).

Inputs:
  emb[query_tower]: [B, D]; emb[label_tower]: [L, D] (L divisible by the number of batch shards).
  batch["positive_ids"]: int [B, P] sampled positive label ids (-1 = padding); required.
  batch["positive_weights"]: float [B, P] aligned with positive_ids; optional (default 1).
  batch["all_positive_ids"]: int [B, P*] every positive (-1 = padding); default positive_ids.
  batch["label_ids"]: int [L] ids of the pool's labels; default the global column index 0..L-1.
  batch["label_valid"]: bool [L]; batch["valid"]: bool [B]. Optional.
  batch["topk_k"]: [B] per-row k of the soft top-k (topk_k_mode="per_row").
  With in_batch_ids=True (image/text pairs whose batch["ids"] name classes): positive_ids = ids[:, None] and
  label_ids = ids, so every in-batch label sharing the row's id is a positive.
Params: {} or {"logit_scale"}. Metrics: loss, accuracy (the top label is a positive), rows, logit_scale.
`sample_positives` draws P_i from P*_i (without replacement, ∝ relevance) for the input pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.errors import ConfigError
from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry

MODES = ("decoupled", "softmax", "topk", "bce")
K_MODES = ("fixed", "num_pos", "per_row")
_V_MIN = 1e-30  # Σv below this: the threshold is flat in ℓ (every sigmoid saturated); no Newton step


def _default_config():
  return dict(
      query_tower="query",
      label_tower="label",
      **common.scale_fields(0.05, False),
      mode="decoupled",        # "decoupled" | "softmax" | "topk" | "bce"
      topk_k=5,                # K of the soft top-k (applied to logits already divided by τ)
      topk_k_mode="fixed",     # "fixed" | "num_pos" (the row's positives) | "per_row" (batch["topk_k"])
      topk_alpha=2.0,
      topk_n_iter=32,
      in_batch_ids=False,      # True: the pool is the batch's own labels; batch["ids"] gives positives and label ids
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_key(cfg, "query_tower", "label_tower")
  common.check_scale(cfg)
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
  p = out["positive_ids"].shape[1]
  for key, shape, dtype in (("label_ids", (n,), jnp.int32), ("label_valid", (n,), bool), ("valid", (b,), bool),
                            ("positive_weights", (b, p), jnp.float32)):
    x = common.array(batch, key, "batch", shape=shape, required=False)
    if x is not None:
      out[key] = x.astype(dtype)
  if cfg.mode == "topk" and cfg.topk_k_mode == "per_row":
    out["topk_k"] = common.array(batch, "topk_k", "batch", shape=(b,)).astype(jnp.float32)
  if cfg.mode == "topk" and cfg.topk_k_mode == "fixed" and not 0 < cfg.topk_k < n:
    raise ConfigError(f"{registry.field_path('topk_k')} must be in (0, {n}) (the label pool size), got {cfg.topk_k}")
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
                     ignore_ids=None if cfg.mode == "softmax" else s["all_positive_ids"],
                     pos_weights=s.get("positive_weights"))
  return rows, keys


def _sigmoid_stats(alpha):
  """f − k = above − k + excess and Σv at the per-row threshold aux["t"] (module docstring, mode="topk")."""
  x = lambda t: alpha * (t.s + t.aux["t"][:, None])
  return {"above": engine.total("pool", lambda t: (x(t) > 0).astype(jnp.float32)),
          "excess": engine.total("pool", lambda t: jnp.where(x(t) > 0, -jax.nn.sigmoid(-x(t)), jax.nn.sigmoid(x(t)))),
          "v": engine.total("pool", lambda t: alpha * jax.nn.sigmoid(x(t)) * jax.nn.sigmoid(-x(t)))}


def _newton(t, st, k):
  """t − (f(t) − k)/Σv (with the gradient of f through `st`); no step where Σv underflows."""
  v = jnp.where(st["v"] > _V_MIN, lax.stop_gradient(st["v"]), jnp.inf)
  return t - ((st["above"] - k) + st["excess"]) / v


def soft_topk_threshold(rows, keys, k, *, alpha, n_iter, scale, pass_kw):
  """Per-row t with Σ_pool σ(α(ℓ + t)) = k: bisection and a Newton refinement (no gradient), then one
  differentiable Newton step at the refined threshold (the implicit gradient).

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
  stats = _sigmoid_stats(alpha)
  at = lambda rows_, keys_, t, scale_: engine.reduce_rows(stats, rows_._replace(aux={"t": t}), keys_, scale=scale_,
                                                          **pass_kw)

  def step(_, bracket):
    lo, hi = bracket
    mid = 0.5 * (lo + hi)
    st = at(rows_ng, keys_ng, mid, sg(scale))
    below = (st["above"] - k) + st["excess"] < 0
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = lax.fori_loop(0, n_iter, step, (lo, hi))
  mid = 0.5 * (lo + hi)
  t1 = sg(jnp.clip(_newton(mid, at(rows_ng, keys_ng, mid, sg(scale)), k), lo, hi))
  t = _newton(t1, at(rows, keys, t1, scale), k)
  return jnp.where(ok, t, 0.0), ok


def _weighted(fn):
  """fn(tile) times each positive's weight (Tile.pos_weight; 1 without positive weights)."""
  return lambda t: fn(t) if t.pos_weight is None else t.pos_weight * fn(t)


def _per_row_loss(cfg, s, rows, keys, scale, pass_kw):
  """(per-row loss [R], ok [R], statistics with the top-1 ones) of the DEXML mode `cfg.mode`."""
  base = {"pos_count": engine.count("pos"), **engine.top1_stats()}
  z = lambda m, x: jnp.where(m, x, 0.0)
  if cfg.mode == "softmax":
    st = engine.reduce_rows({**base, "lse": engine.lse("pool"), "pos_w": engine.total("pos", _weighted(lambda t: 1.0)),
                             "pos": engine.total("pos", _weighted(lambda t: t.s))}, rows, keys, scale=scale, **pass_kw)
    ok = st["pos_count"] > 0
    return z(ok, st["pos_w"] * z(ok, st["lse"]) - st["pos"]), ok, st
  if cfg.mode == "bce":
    st = engine.reduce_rows({**base, "n": engine.count("pool"),
                             "pos": engine.total("pos", _weighted(lambda t: jax.nn.softplus(-t.s))),
                             "neg": engine.total("neg", lambda t: jax.nn.softplus(t.s))}, rows, keys, scale=scale,
                            **pass_kw)
    ok = st["pos_count"] > 0
    return z(ok, (st["pos"] + st["neg"]) / jnp.maximum(st["n"], 1.0)), ok, st
  if cfg.mode == "decoupled":
    st = engine.reduce_rows({**base, "lse_neg": engine.lse("neg")}, rows, keys, scale=scale, **pass_kw)
    ok = st["pos_count"] > 0
    off = jnp.where(ok, st["lse_neg"], -jnp.inf)
    loss_sum = engine.reduce_rows(
        {"l": engine.total("pos", _weighted(lambda t: jax.nn.softplus(t.aux["off"][:, None] - t.s)))},
        rows._replace(aux={"off": off}), keys, scale=scale, **pass_kw)["l"]
    return z(ok, loss_sum / jnp.maximum(st["pos_count"], 1.0)), ok, st
  if cfg.topk_k_mode == "fixed":
    k = jnp.full(rows.valid.shape, float(cfg.topk_k))
  elif cfg.topk_k_mode == "num_pos":
    k = jnp.sum(s["all_positive_ids"] >= 0, axis=1).astype(jnp.float32)
  else:
    k = s["topk_k"]
  st = engine.reduce_rows(base, rows, keys, scale=scale, **pass_kw)
  t, k_ok = soft_topk_threshold(rows, keys, k, alpha=cfg.topk_alpha, n_iter=cfg.topk_n_iter, scale=scale,
                                pass_kw=pass_kw)
  ok = (st["pos_count"] > 0) & k_ok
  alpha = cfg.topk_alpha
  nll_sum = engine.reduce_rows(
      {"l": engine.total("pos", _weighted(lambda tl: jax.nn.softplus(-alpha * (tl.s + tl.aux["t"][:, None]))))},
      rows._replace(aux={"t": t}), keys, scale=scale, **pass_kw)["l"]
  return z(ok, nll_sum / jnp.maximum(st["pos_count"], 1.0)), ok, st


def _local(cfg, s, r, shards):
  """DEXML loss on the local shard `s` (inside shard_map)."""
  rows, keys = _layout(cfg, s, shards)
  key_mode = cfg.key_mode
  if key_mode == "gather":  # several passes over the same keys: gather them once
    keys, key_mode = engine.gather_keys(keys, shards), "local"
  pass_kw = dict(tile_size=cfg.tile_size, key_mode=key_mode, shards=shards)
  per_row, ok, st = _per_row_loss(cfg, s, rows, keys, r["logit_scale"], pass_kw)
  loss = engine.global_mean(per_row, ok, shards)
  return loss, {"loss": loss, "accuracy": engine.top1_accuracy(st, ok, shards),
                "rows": shards.psum(jnp.sum(ok, dtype=jnp.float32))}


SPEC = common.register_engine_loss("dexml", _default_config, _validate, _inputs, _local, task_types=("multilabel",))
