"""Pairwise ranking losses on scored pairs: CoSENT (Su 2022; as used by Piccolo2, arXiv 2405.06932 §3).

A batch holds `B` pairs `(a_i, b_i)` with a float gold score `y_i` (an STS score, or 0/1 for pair
classification). With the pair cosines `c_i = cos(a_i, b_i)`, CoSENT asks every pair with the higher gold
score to also have the higher cosine:

    L = w · log(1 + Σ_{(i, j): y_i < y_j} exp(λ (c_i − c_j)))

over all ordered pairs of the batch, λ = 1/temperature; ties (`y_i == y_j`) contribute nothing. It is computed
as `softplus(LSE)` of the masked `[B, B]` differences, so `λ·Δc` up to 40 never overflows and a well-ranked
batch (LSE ≪ 0, a loss far below float32's 1 + ε) keeps its relative precision. Piccolo2 uses τ = 0.05 (λ = 20)
and weight 0.04 (see `hybrid`); the registered `cosent` loss defaults to weight 1.

Inputs: emb[towers[0]], emb[towers[1]]: [B, D] (a_i, b_i); batch["score"]: float [B]; batch["valid"]: optional
bool [B] (pairs touching a padded row are left out). Output: the scalar loss and metrics {loss, cosent (the
unweighted value), pair_accuracy, ranked_pairs}.

Sharding: the loss needs only the `[B_g]` cosines and a `[B_g, B_g]` matrix, so it is written in plain `jnp`
on the global (batch-sharded) arrays and GSPMD inserts the (tiny) collectives; no `shard_map` is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import registry
from big_embed.ops import l2_normalize


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine: a, b [..., D] -> [...], float32."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def cosent_from_cosines(c: jax.Array, score: jax.Array, scale: float,
                        valid: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Unweighted CoSENT `log(1 + Σ_{y_i<y_j} exp(λ(c_i − c_j)))` from the pair cosines.

  Args:
    c: [B] float32 pair cosines.
    score: [B] gold scores (any real dtype); only their order matters.
    scale: λ > 0.
    valid: optional bool [B]; pairs involving an invalid (padded) row are left out.
  Returns:
    the scalar loss and {"pair_accuracy": share of ranked pairs with c_i < c_j, "ranked_pairs": their count}.
  """
  score = score.astype(jnp.float32)
  ranked = score[:, None] < score[None, :]  # [B, B]  y_i < y_j
  if valid is not None:
    ranked = ranked & valid[:, None] & valid[None, :]
  diff = scale * (c[:, None] - c[None, :])  # [B, B]  λ (c_i − c_j)
  # log(1 + Σ e^x) = softplus(LSE(x)); no ranked pair: 0. `diff` is finite everywhere, so the `where`s pass
  # zero gradient to masked entries (and the LSE of an all-masked matrix is never differentiated).
  any_ranked = jnp.any(ranked)
  lse = jax.nn.logsumexp(jnp.where(ranked | ~any_ranked, diff, -jnp.inf))
  loss = jnp.where(any_ranked, jax.nn.softplus(lse), 0.0)
  n_ranked = jnp.sum(ranked.astype(jnp.float32))
  n_right = jnp.sum((ranked & (diff < 0)).astype(jnp.float32))
  return loss, {"pair_accuracy": n_right / jnp.maximum(n_ranked, 1.0), "ranked_pairs": n_ranked}


def cosent_loss(a: jax.Array, b: jax.Array, score: jax.Array, scale: float = 20.0,
                valid: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """Unweighted CoSENT on pairs a, b [B, D] (cosine, so un-normalised inputs are fine) with scores [B]."""
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"cosent: a and b must both be [B, D], got {a.shape} and {b.shape}")
  if score.shape != a.shape[:1]:
    raise ValueError(f"cosent: score must be [B]=[{a.shape[0]}], got {score.shape}")
  if valid is not None and valid.shape != a.shape[:1]:
    raise ValueError(f"cosent: valid must be [B]=[{a.shape[0]}], got {valid.shape}")
  return cosent_from_cosines(cosine(a, b), score, scale, valid)


# ----------------------------------------------------------------------------------------------------------
# Registered loss.


def _default_config():
  return dict(
      towers=("query", "key"),  # emb keys of a and b, each [B, D]
      score_key="score",        # batch[score_key]: float [B] gold scores; optional batch["valid"]: bool [B]
      temperature=0.05,         # τ; λ = 1/τ (Piccolo2: τ = 0.05, λ = 20)
      weight=1.0,               # w (Piccolo2's hybrid uses 0.04)
  )


def _validate(cfg):
  common.check_towers(cfg, "towers", 2)
  common.check_key(cfg, "score_key")
  common.check_positive(cfg, "temperature")
  common.check_range(cfg, "weight", lo=0.0)


def _build(cfg, mesh, task=None):
  del mesh, task  # plain jnp on global arrays (see module docstring)
  a_key, b_key = cfg.towers
  scale, weight = 1.0 / cfg.temperature, float(cfg.weight)

  def loss_fn(emb, batch, loss_params, step):
    del loss_params, step
    a = common.array(emb, a_key, "emb", ndim=2)
    b = common.array(emb, b_key, "emb", shape=a.shape)
    score = common.array(batch, cfg.score_key, "batch", shape=a.shape[:1])
    valid = common.array(batch, "valid", "batch", shape=a.shape[:1], required=False)
    raw, metrics = cosent_from_cosines(cosine(a, b), score, scale, None if valid is None else valid.astype(bool))
    loss = weight * raw
    return loss, {"loss": loss, "cosent": raw, **metrics}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="cosent", build=_build, default_config=_default_config, validate=_validate, task_types=("sts",)))
