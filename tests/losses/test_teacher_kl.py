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


def naive_scores(batch, tau_t, lam, scale=None):
  """(loss, metrics) references; the candidates are the row's key (the positive) and its hard negatives."""
  valid = batch["valid"]
  mask = np.concatenate([np.ones((B, 1), bool), batch["hard_negative_valid"]], axis=1)[valid]
  kappa = (lambda params: scale) if scale is not None else _scale

  def student(emb, params):
    cand = jnp.concatenate([emb["key"][:, None], emb["hard_negatives"]], axis=1)  # [B, 1+H, D]
    return kappa(params) * jnp.einsum("bd,bcd->bc", emb["query"], cand)[valid]

  def ref(emb, params):
    kl, ce = _kl_ce(student(emb, params), batch["teacher_scores"][valid] / tau_t, mask)
    return kl + lam * ce

  def metrics(emb, params):
    first = np.zeros(mask.shape, bool)
    first[:, 0] = True
    return {"accuracy": util.top1(np.asarray(student(emb, params)), first, mask & ~first)}

  return ref, metrics


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

  def student(emb):
    q = emb["query"]
    s_keys = jnp.take_along_axis(q @ emb["key"].T, order, axis=1)
    return SCALE * jnp.concatenate([s_keys, jnp.einsum("bd,bhd->bh", q, emb["hard_negatives"])], axis=1)[valid]

  def ref(emb, params):
    del params
    kl, ce = _kl_ce(student(emb), teacher, mask)
    return kl + lam * ce

  def metrics(emb, params):
    del params
    first = np.zeros(mask.shape, bool)
    first[:, 0] = True
    return {"accuracy": util.top1(np.asarray(student(emb)), first, mask & ~first)}

  return ref, metrics


@pytest.mark.parametrize("n,key_mode,tile", util.SHORT)
def test_teacher_scores_matches_naive(n, key_mode, tile):
  emb, batch = inputs(60)
  emb["hard_negatives"][:8, 0] = emb["query"][:8]  # negatives that outscore the positive: accuracy < 1
  batch["hard_negative_valid"][:8, 0] = True
  params = {"logit_scale": jnp.float32(np.log(12.0))}  # learnable temperature: d/d logit_scale checked too
  ref, metrics = naive_scores(batch, 2.0, 0.3)
  _, got = util.check("teacher_kl", n, emb, batch, ref, params=params, tile_size=tile, key_mode=key_mode,
                      teacher_temperature=2.0, hard_label_weight=0.3, learnable_temperature=True,
                      metrics_ref=metrics)
  assert 0 < float(got["accuracy"]) < 1


@pytest.mark.parametrize("n,key_mode,tile", util.SETUPS)
def test_teacher_embeddings_matches_naive(n, key_mode, tile):
  emb, batch = inputs(61)
  ref, metrics = naive_embeddings(batch, 0.1, 0.5)
  _, got = util.check("teacher_kl", n, emb, batch, ref, tile_size=tile, key_mode=key_mode,
                      teacher_source="embeddings", teacher_temperature=0.1, hard_label_weight=0.5, metrics_ref=metrics)
  assert 0 < float(got["accuracy"]) < 1


def test_teacher_equal_to_student_gives_zero_kl():
  emb, batch = inputs(62)
  cand = np.concatenate([emb["key"][:, None], emb["hard_negatives"]], axis=1)
  # Teacher logits r/τ_T equal to the student's: r = τ_T · κ · q·k.
  batch["teacher_scores"] = 2.0 * SCALE * np.einsum("bd,bcd->bc", emb["query"], cand)
  _, metrics, _, _ = util.run("teacher_kl", 1, emb, batch, tile_size=5, teacher_temperature=2.0,
                              hard_label_weight=0.3)
  assert abs(float(metrics["loss_kl"])) < 1e-5
  assert float(metrics["loss_ce"]) > 0


def test_teacher_kl_learnable_init_params_give_the_configured_scale():
  """init_params: κ = exp(t) = 1/temperature; the loss at those params is the reference's at that τ."""
  emb, batch = inputs(63)
  ref, _ = naive_scores(batch, 2.0, 0.3, scale=8.0)
  util.check_init_scale("teacher_kl", emb, batch, lambda emb: ref(emb, {}), teacher_temperature=2.0,
                        hard_label_weight=0.3)
