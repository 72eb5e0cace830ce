"""Pairwise ranking losses on scored pairs: CoSENT (Su 2022; as used by Piccolo2, arXiv 2405.06932 §3).

A batch holds `B` pairs `(a_i, b_i)` with a float gold score `y_i` (an STS score, or 0/1 for pair
classification). With the pair cosines `c_i = cos(a_i, b_i)`, CoSENT asks every pair with the higher gold
score to also have the higher cosine:

    L = w · log(1 + Σ_{(i, j): y_i < y_j} exp(λ (c_i − c_j)))

over all ordered pairs of the batch; ties (`y_i == y_j`) contribute nothing. It is computed as one
log-sum-exp over the masked `[B, B]` differences with a 0 appended (the "1 +"), so `λ·Δc` up to 40 never
overflows. Piccolo2 uses λ = 1/0.05 = 20 and weight 0.04 (see `hybrid`); the registered `cosent` loss
defaults to weight 1.

Sharding: the loss needs only the `[B_g]` cosines and a `[B_g, B_g]` matrix, so it is written in plain `jnp`
on the global (batch-sharded) arrays and GSPMD inserts the (tiny) collectives; no `shard_map` is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from big_embed.losses import registry

_EPS = 1e-8


def l2_normalize(x: jax.Array, eps: float = _EPS) -> jax.Array:
  """`x / max(‖x‖₂, eps)` over the last axis, in float32; finite gradient at x = 0."""
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine: a, b [..., D] -> [...], float32."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def cosent_from_cosines(c: jax.Array, score: jax.Array, scale: float) -> tuple[jax.Array, dict]:
  """Unweighted CoSENT `log(1 + Σ_{y_i<y_j} exp(λ(c_i − c_j)))` from the pair cosines.

  Args:
    c: [B] float32 pair cosines.
    score: [B] gold scores (any real dtype); only their order matters.
    scale: λ > 0.
  Returns:
    the scalar loss and {"pair_accuracy": share of ranked pairs with c_i < c_j, "ranked_pairs": their count}.
  """
  score = score.astype(jnp.float32)
  ranked = score[:, None] < score[None, :]  # [B, B]  y_i < y_j
  diff = scale * (c[:, None] - c[None, :])  # [B, B]  λ (c_i − c_j)
  # `diff` is finite everywhere, so the plain `where` passes zero gradient to masked entries.
  masked = jnp.where(ranked, diff, -jnp.inf).reshape(-1)  # [B·B]
  loss = jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32), masked]))
  n_ranked = jnp.sum(ranked.astype(jnp.float32))
  n_right = jnp.sum((ranked & (diff < 0)).astype(jnp.float32))
  return loss, {"pair_accuracy": n_right / jnp.maximum(n_ranked, 1.0), "ranked_pairs": n_ranked}


def check_pairs(a: jax.Array, b: jax.Array, score: jax.Array, names=("a", "b", "score")) -> None:
  """Raises ValueError unless a, b are [B, D] of equal shape and score is [B]."""
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(
        f"cosent: {names[0]} and {names[1]} must both be [B, D], got {a.shape} and {b.shape}")
  if score.shape != (a.shape[0],):
    raise ValueError(f"cosent: {names[2]} must be [B]=[{a.shape[0]}], got {score.shape}")


def cosent_loss(a: jax.Array, b: jax.Array, score: jax.Array, scale: float = 20.0) -> tuple[jax.Array, dict]:
  """Unweighted CoSENT on pairs a, b [B, D] (cosine, so un-normalised inputs are fine) with scores [B]."""
  check_pairs(a, b, score)
  return cosent_from_cosines(cosine(a, b), score, scale)


# ----------------------------------------------------------------------------------------------------------
# Registered loss.


def _default_config():
  return dict(
      towers=("query", "pos"),  # emb keys of a and b, each [B, D]
      score_key="score",        # batch[score_key]: float [B] gold scores
      scale=20.0,               # λ = 1/τ (Piccolo2: τ = 0.05)
      weight=1.0,               # w (Piccolo2's hybrid uses 0.04)
  )


def _validate(cfg):
  if len(cfg.towers) != 2:
    raise ValueError(f"config.loss.towers must name exactly 2 emb keys (a, b), got {tuple(cfg.towers)}")
  if not cfg.scale > 0:
    raise ValueError(f"config.loss.scale (CoSENT λ) must be > 0, got {cfg.scale}")
  if not cfg.weight >= 0:
    raise ValueError(f"config.loss.weight must be >= 0, got {cfg.weight}")


def _build(cfg, mesh):
  del mesh  # plain jnp on global arrays (see module docstring)
  a_key, b_key = cfg.towers
  scale, weight = float(cfg.scale), float(cfg.weight)

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    if cfg.score_key not in batch:
      raise ValueError(f"cosent: batch has no {cfg.score_key!r} (config.loss.score_key); keys: {sorted(batch)}")
    a, b, score = emb[a_key], emb[b_key], batch[cfg.score_key]
    check_pairs(a, b, score, names=(f"emb[{a_key!r}]", f"emb[{b_key!r}]", f"batch[{cfg.score_key!r}]"))
    raw, metrics = cosent_from_cosines(cosine(a, b), score, scale)
    loss = weight * raw
    return loss, {"loss": loss, "cosent": raw, **metrics}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="cosent", build=_build, default_config=_default_config, validate=_validate))
