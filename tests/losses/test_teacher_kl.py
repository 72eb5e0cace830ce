"""Teacher soft labels (KL over the candidate set) vs a naive implementation, both teacher sources."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.losses import util

B, D, H, DT = 24, 8, 3, 5
SCALE = 20.0


def _scale(params):
  return jnp.exp(params["logit_scale"]) if "logit_scale" in params else SCALE


def inputs(seed):
  rng, q, k = util.pairs(seed)
  emb = {"query": q, "key": k, "hard_negatives": util.unit(rng, B, H, D)}
  valid, _ = util.masks(rng)
  batch = {"valid": valid, "hard_negative_valid": rng.random((B, H)) > 0.3,
           "teacher_scores": rng.normal(size=(B, 1 + H)).astype(np.float32),
           "teacher_query": rng.normal(size=(B, DT)).astype(np.float32),
           "teacher_key": rng.normal(size=(B, DT)).astype(np.float32),
           "teacher_hard_negatives": rng.normal(size=(B, H, DT)).astype(np.float32)}
  return emb, batch


def _kl_ce(student, teacher, mask):
  """Mean over rows of KL(softmax(teacher) ‖ softmax(student)) and −log p[0] over the masked candidates."""
  logp = jax.nn.log_softmax(jnp.where(mask, student, -jnp.inf), axis=1)
  logy = jax.nn.log_softmax(jnp.where(mask, teacher, -jnp.inf), axis=1)
  kl = jnp.sum(jnp.where(mask, jnp.exp(logy) * (logy - logp), 0.0), axis=1)
  return jnp.mean(kl), jnp.mean(-logp[:, 0])


def naive_scores(batch, tau_t, lam):
  valid = batch["valid"]
  mask = np.concatenate([np.ones((B, 1), bool), batch["hard_negative_valid"]], axis=1)[valid]

  def ref(emb, params):
    cand = jnp.concatenate([emb["key"][:, None], emb["hard_negatives"]], axis=1)  # [B, 1+H, D]
    student = _scale(params) * jnp.einsum("bd,bcd->bc", emb["query"], cand)[valid]
    kl, ce = _kl_ce(student, batch["teacher_scores"][valid] / tau_t, mask)
    return kl + lam * ce

  return ref


def naive_embeddings(batch, tau_t, lam):
  valid = batch["valid"]
  norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  tq, tk, th = norm(batch["teacher_query"]), norm(batch["teacher_key"]), norm(batch["teacher_hard_negatives"])
  # Candidates of row i: its positive first, then every other valid key, then its hard negatives.
  order = np.stack([np.concatenate([[i], np.delete(np.arange(B), i)]) for i in range(B)])  # [B, B]
  key_mask = valid[order]  # [B, B]
  mask = np.concatenate([key_mask, batch["hard_negative_valid"]], axis=1)[valid]
  teacher = np.concatenate([np.take_along_axis(tq @ tk.T, order, axis=1),
                            np.einsum("bd,bhd->bh", tq, th)], axis=1)[valid] / tau_t

  def ref(emb, params):
    del params
    q = emb["query"]
    s_keys = jnp.take_along_axis(q @ emb["key"].T, order, axis=1)
    student = SCALE * jnp.concatenate([s_keys, jnp.einsum("bd,bhd->bh", q, emb["hard_negatives"])], axis=1)
    kl, ce = _kl_ce(student[valid], teacher, mask)
    return kl + lam * ce

  return ref


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_teacher_scores_matches_naive(n, key_mode, tile):
  emb, batch = inputs(60)
  params = {"logit_scale": jnp.float32(np.log(12.0))}  # learnable temperature: d/d logit_scale checked too
  util.check("teacher_kl", n, emb, batch, naive_scores(batch, 2.0, 0.3), params=params, tile_size=tile,
             key_mode=key_mode, teacher_temperature=2.0, hard_label_weight=0.3, learnable_temperature=True)


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_teacher_embeddings_matches_naive(n, key_mode, tile):
  emb, batch = inputs(61)
  util.check("teacher_kl", n, emb, batch, naive_embeddings(batch, 0.1, 0.5), tile_size=tile, key_mode=key_mode,
             teacher_source="embeddings", teacher_temperature=0.1, hard_label_weight=0.5)


def test_teacher_equal_to_student_gives_zero_kl():
  emb, batch = inputs(62)
  cand = np.concatenate([emb["key"][:, None], emb["hard_negatives"]], axis=1)
  # Teacher logits r/τ_T equal to the student's: r = τ_T · κ · q·k.
  batch["teacher_scores"] = 2.0 * SCALE * np.einsum("bd,bcd->bc", emb["query"], cand)
  _, metrics, _, _ = util.run("teacher_kl", 1, emb, batch, tile_size=5, teacher_temperature=2.0,
                              hard_label_weight=0.3)
  assert abs(float(metrics["loss_kl"])) < 1e-5
  assert float(metrics["loss_ce"]) > 0
