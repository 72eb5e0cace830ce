"""Distillation losses against naive loop implementations, on 1 device and sharded over 8 fake devices."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.errors import ConfigError
from big_embed.losses import distill
from tests.losses import util

TOL = dict(rtol=1e-5, atol=1e-5)

# ---------------------------------------------------------------------------------------------------------
# Naive references in NumPy float64, one row / pair at a time; gradients by central finite differences.


def np_softmax(z):
  e = np.exp(z - np.max(z))
  return e / np.sum(e)


def np_kd(zs, zt, t, mode):
  """mean over rows of the divergence between softmax(z_S/T) and softmax(z_T/T)."""
  zs, zt = np.float64(zs), np.float64(zt)
  rows = []
  for i in range(zs.shape[0]):
    if mode == "mse":
      rows.append(np.mean((zs[i] / t - zt[i] / t) ** 2))
      continue
    ps, pt = np_softmax(zs[i] / t), np_softmax(zt[i] / t)
    kl = lambda p, q: np.sum(p * (np.log(p) - np.log(q)))
    rows.append({"kl": lambda: kl(pt, ps), "reverse_kl": lambda: kl(ps, pt),
                 "js": lambda: 0.5 * kl(pt, (ps + pt) / 2) + 0.5 * kl(ps, (ps + pt) / 2),
                 "soft_ce": lambda: -np.sum(pt * np.log(ps))}[mode]())
  return np.mean(rows)


def np_sinkhorn(zs, zt, t=2.0, eps=0.1, iters=20):
  """Sinkhorn-Knopp: W_ij = ‖p_S,i − p_T,j‖₁, K = exp(−W/ε), `iters` row then column normalisations."""
  b = zs.shape[0]
  ps = [np_softmax(np.float64(zs[i]) / t) for i in range(b)]
  pt = [np_softmax(np.float64(zt[j]) / t) for j in range(b)]
  w = np.array([[np.sum(np.abs(ps[i] - pt[j])) for j in range(b)] for i in range(b)])
  k = np.exp(-w / eps)
  for _ in range(iters):
    for i in range(b):
      k[i] = k[i] / np.sum(k[i])
    for j in range(b):
      k[:, j] = k[:, j] / np.sum(k[:, j])
  return np.sum(k * w)


def np_ce(zs, y):
  return np.mean([-np.log(np_softmax(np.float64(zs[i]))[y[i]]) for i in range(len(y))])


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _run(name, cfg, mesh, emb, batch, step=0):
  """jit(value_and_grad) of the registered loss w.r.t. (emb, batch) on sharded inputs."""
  loss_fn = losses.get(name).build(cfg, mesh)
  params = losses.get(name).init_params(cfg)

  def f(emb, floats, ints, step):
    return loss_fn(emb, {**floats, **ints}, params, step)

  emb, batch = util.put(mesh, (emb, batch))
  floats = {k: v for k, v in batch.items() if jnp.issubdtype(v.dtype, jnp.floating)}
  ints = {k: v for k, v in batch.items() if k not in floats}
  (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
      emb, floats, ints, jnp.int32(step))
  return loss, metrics, grads


def _logits(seed, b=8, c=5, spread=3.0):
  rng = np.random.default_rng(seed)
  zs = (spread * rng.normal(size=(b, c))).astype(np.float32)
  zt = (spread * rng.normal(size=(b, c))).astype(np.float32)
  y = rng.integers(0, c, size=b).astype(np.int32)
  return zs, zt, y


# ---------------------------------------------------------------------------------------------------------
# logit_kd


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("mode", distill.KD_MODES)
def test_logit_kd_matches_naive(mode, n_dev):
  zs, zt, _ = _logits(0)
  cfg = losses.loss_config("logit_kd", mode=mode, temperature=2.5, t2_factor=True, weight=0.5)
  loss, metrics, (g_emb, g_batch) = _run("logit_kd", cfg, util.mesh(n_dev), {"logits": zs}, {"teacher_logits": zt})
  ref = lambda zs: 0.5 * 2.5**2 * np_kd(zs, zt, 2.5, mode)
  np.testing.assert_allclose(loss, ref(zs), **TOL)
  np.testing.assert_allclose(g_emb["logits"], util.fd_grad(ref, zs), **TOL)
  assert not np.any(g_batch["teacher_logits"])  # teacher under stop_gradient
  agree = np.mean([np.argmax(zs[i]) == np.argmax(zt[i]) for i in range(len(zs))])
  assert 0 < agree < 1  # the inputs tell a right metric from a constant one
  np.testing.assert_allclose(metrics["teacher_agreement"], agree, rtol=1e-6)


def test_logit_kd_teacher_from_emb_gets_no_gradient():
  zs, zt, _ = _logits(1)
  cfg = losses.loss_config("logit_kd", teacher="teacher", teacher_from="emb", mode="js")
  loss, _, (g_emb, _) = _run("logit_kd", cfg, util.mesh(1), {"logits": zs, "teacher": zt}, {})
  np.testing.assert_allclose(loss, np_kd(zs, zt, 1.0, "js"), **TOL)
  assert not np.any(g_emb["teacher"]) and np.any(g_emb["logits"])


def test_kd_zero_when_equal():
  zs, _, _ = _logits(2)
  for mode in ("kl", "reverse_kl", "js", "mse"):  # soft_ce is the teacher entropy there
    np.testing.assert_allclose(distill.kd_divergence(zs, zs, 3.0, mode), 0.0, atol=1e-6)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(b=st.integers(1, 4), c=st.integers(2, 5), t=st.sampled_from([0.5, 1.0, 4.0]),
                  mode=st.sampled_from(distill.KD_MODES), seed=st.integers(0, 2**16))
def test_property_kd(b, c, t, mode, seed):
  zs, zt, _ = _logits(seed, b, c)
  fn = jax.jit(jax.value_and_grad(lambda zs, zt: jnp.mean(distill.kd_divergence(zs, zt, t, mode))))
  loss, g = fn(zs, zt)
  ref = lambda zs: np_kd(zs, zt, t, mode)
  np.testing.assert_allclose(loss, ref(zs), **TOL)
  np.testing.assert_allclose(g, util.fd_grad(ref, zs), **TOL)
  assert loss >= -1e-6 or mode == "soft_ce"


# ---------------------------------------------------------------------------------------------------------
# Sinkhorn


@pytest.mark.parametrize("mode", distill.SINKHORN_MODES)
def test_sinkhorn_matches_naive(mode):
  zs, zt, _ = _logits(3, b=6, c=4)
  fn = lambda zs: distill.sinkhorn_distance(zs, zt, 2.0, 0.1, 20, mode)
  d, g = jax.value_and_grad(fn)(jnp.asarray(zs))
  ref = lambda zs: np_sinkhorn(zs, zt)
  np.testing.assert_allclose(d, ref(zs), **TOL)
  np.testing.assert_allclose(g, util.fd_grad(ref, zs), **TOL)


def test_sinkhorn_plan_marginals():
  cost = jnp.asarray(np.random.default_rng(4).uniform(0, 2, size=(5, 5)), jnp.float32)
  plan = distill.sinkhorn_plan(cost, 0.1, 20, "log")
  np.testing.assert_allclose(plan.sum(0), 1.0, atol=1e-5)  # the last step normalises columns
  np.testing.assert_allclose(plan.sum(), 5.0, atol=1e-4)


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(b=st.integers(1, 5), c=st.integers(2, 5), eps=st.sampled_from([0.1, 0.3, 1.0]),
                  spread=st.sampled_from([0.1, 3.0, 1e3]), seed=st.integers(0, 2**16))
def test_property_sinkhorn_fp32_finite_and_modes_agree(b, c, eps, spread, seed):
  # W ∈ [0, 2] and ε ≥ 0.1, so W/ε ≤ 20: the plain fp32 iteration must stay finite, value and gradient.
  zs, zt, _ = _logits(seed, b, c, spread)
  vg = lambda zs, zt, mode: jax.value_and_grad(distill.sinkhorn_distance)(zs, zt, 2.0, eps, 20, mode)
  (d_plain, g_plain), (d_log, g_log) = jax.jit(lambda zs, zt: (vg(zs, zt, "plain"), vg(zs, zt, "log")))(zs, zt)
  assert np.isfinite(d_plain) and np.all(np.isfinite(g_plain))
  np.testing.assert_allclose(d_log, d_plain, **TOL)
  np.testing.assert_allclose(g_log, g_plain, **TOL)
  np.testing.assert_allclose(d_plain, np_sinkhorn(zs, zt, eps=eps), **TOL)


def test_sinkhorn_worst_case_w_over_eps_20():
  # One-hot students all on class 0, teachers all on class 1: every W_ij = 2, so W/ε = 20 at ε = 0.1.
  zs = jnp.asarray(np.tile([[1e4, 0, 0]], (4, 1)).astype(np.float32))
  zt = jnp.asarray(np.tile([[0, 1e4, 0]], (4, 1)).astype(np.float32))
  # Students i and teachers i + 1 share a class: W is 0 there and 2 elsewhere.
  zs2 = jnp.asarray(np.eye(4, dtype=np.float32) * 1e4)
  zt2 = jnp.asarray(np.roll(np.eye(4, dtype=np.float32), 1, axis=1) * 1e4)
  for mode in distill.SINKHORN_MODES:
    fn = jax.jit(jax.value_and_grad(lambda zs, zt: distill.sinkhorn_distance(zs, zt, 2.0, 0.1, 20, mode)))
    d, g = fn(zs, zt)
    assert np.isfinite(d) and np.all(np.isfinite(g))
    np.testing.assert_allclose(d, 8.0, rtol=1e-5)  # every pair costs 2 and the 4 columns sum to 1
    d2, g2 = fn(zs2, zt2)
    assert np.isfinite(d2) and np.all(np.isfinite(g2))
    np.testing.assert_allclose(d2, 0.0, atol=1e-6)  # all mass on the zero-cost pairs


def test_log_sinkhorn_safe_where_plain_underflows():
  cost = jnp.asarray([[0.0, 2.0], [2.0, 2.0]], jnp.float32)
  # ε = 0.01: exp(−200) underflows, so row 2 of K is all zero and the plain iteration divides 0 by 0.
  assert np.isnan(distill.sinkhorn_plan(cost, 0.01, 20, "plain")).any()
  plan = distill.sinkhorn_plan(cost, 0.01, 20, "log")
  assert np.all(np.isfinite(plan))
  g = jax.grad(lambda c: jnp.sum(distill.sinkhorn_plan(c, 0.01, 20, "log") * c))(cost)
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------------------------
# sinkd


def np_sinkd(zs, zt, y, alpha, beta, t, kd_mode="soft_ce", scale=1e-3, t2=False):
  loss = alpha * np_kd(zs, zt, t, kd_mode) * (t * t if t2 else 1.0) + beta * scale * np_sinkhorn(zs, zt)
  if alpha < 1:
    loss = loss + (1 - alpha) * np_ce(zs, y)
  return loss


@pytest.mark.parametrize("n_dev", [1, 8])
def test_sinkd_matches_naive(n_dev):
  zs, zt, y = _logits(5, b=8, c=3)
  y[:5] = np.argmax(zs[:5], axis=-1)  # the student is right on at least 5 of the 8 rows
  cfg = losses.loss_config("sinkd", alpha=0.8, beta=0.8, kd_temperature=3.0)
  loss, metrics, (g_emb, g_batch) = _run("sinkd", cfg, util.mesh(n_dev), {"logits": zs},
                                         {"teacher_logits": zt, "label": y})
  ref = lambda zs: np_sinkd(zs, zt, y, 0.8, 0.8, 3.0)
  np.testing.assert_allclose(loss, ref(zs), **TOL)
  np.testing.assert_allclose(g_emb["logits"], util.fd_grad(ref, zs), **TOL)
  np.testing.assert_allclose(metrics["sinkhorn"], 1e-3 * np_sinkhorn(zs, zt), **TOL)
  assert not np.any(g_batch["teacher_logits"])
  accuracy = np.mean([np.argmax(zs[i]) == y[i] for i in range(len(y))])
  assert 0.5 < accuracy < 1 and accuracy != np.mean(np.argmax(zt, -1) == y)  # not the teacher's accuracy
  np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=1e-6)


def test_sinkd_alpha_one_needs_no_labels_and_log_mode():
  zs, zt, _ = _logits(6, b=8, c=3)
  cfg = losses.loss_config("sinkd", alpha=1.0, sinkhorn_mode="log", kd_mode="kl")
  loss, metrics, _ = _run("sinkd", cfg, util.mesh(8), {"logits": zs}, {"teacher_logits": zt})
  np.testing.assert_allclose(loss, np_sinkd(zs, zt, None, 1.0, 0.8, 2.0, "kl"), **TOL)
  assert "ce" not in metrics


def test_sinkd_temperature_annealing():
  zs, zt, y = _logits(7, b=4, c=3)
  cfg = losses.loss_config("sinkd", alpha=0.5, kd_temperature=4.0, kd_anneal=True, anneal_epochs=5,
                           steps_per_epoch=4, t2_factor=True)
  loss_fn = jax.jit(losses.get("sinkd").build(cfg, None))
  for step, epoch in [(0, 0), (3, 0), (7, 1), (10, 2), (16, 4), (1000, 4)]:
    loss, metrics = loss_fn({"logits": zs}, {"teacher_logits": zt, "label": y}, {}, jnp.int32(step))
    t = 4.0 + (1 - 4.0) * epoch / 4  # T_e = T + (1−T)·e/(E−1), from 4 down to 1
    np.testing.assert_allclose(metrics["kd_temperature"], t, rtol=1e-6)
    np.testing.assert_allclose(loss, np_sinkd(zs, zt, y, 0.5, 0.8, t, t2=True), **TOL)


# ---------------------------------------------------------------------------------------------------------
# disco_mse


def np_disco(students, teachers, reduction, normalize_teacher=True):
  total = 0.0
  for s, t in zip(students, teachers):
    s, t = np.float64(s), np.float64(t)
    b, d = s.shape
    for i in range(b):
      ti = t[i] / np.sqrt(np.sum(t[i] ** 2)) if normalize_teacher else t[i]
      total += np.sum((ti - s[i]) ** 2) / (b * d if reduction == "mean" else 1)
  return total


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("n_dev", [1, 8])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_disco_matches_naive(reduction, n_dev):
  rng = np.random.default_rng(8)
  sq, sk = (_unit(rng.normal(size=(8, 4))).astype(np.float32) for _ in range(2))
  tq, tk = (rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2))  # un-normalised teacher
  cfg = losses.loss_config("disco_mse", students=("q", "q_k"), teachers=("t_q", "t_k"), reduction=reduction,
                           weight=2.0)
  loss, _, (g_emb, g_batch) = _run("disco_mse", cfg, util.mesh(n_dev), {"q": sq, "q_k": sk},
                                   {"t_q": tq, "t_k": tk})
  np.testing.assert_allclose(loss, 2.0 * np_disco((sq, sk), (tq, tk), reduction), **TOL)
  np.testing.assert_allclose(g_emb["q"], util.fd_grad(lambda x: 2.0 * np_disco((x,), (tq,), reduction), sq), **TOL)
  np.testing.assert_allclose(g_emb["q_k"], util.fd_grad(lambda x: 2.0 * np_disco((x,), (tk,), reduction), sk), **TOL)
  assert not np.any(g_batch["t_q"])


def test_disco_with_inner_contrastive_loss():
  rng = np.random.default_rng(9)
  img, txt, tea = (_unit(rng.normal(size=(8, 4))).astype(np.float32) for _ in range(3))
  inner = losses.loss_config("cosent", towers=("image", "text"))
  cfg = losses.loss_config("disco_mse", students=("image",), teachers=("teacher",), inner=inner)
  y = rng.normal(size=8).astype(np.float32)
  loss, metrics, _ = _run("disco_mse", cfg, util.mesh(8), {"image": img, "text": txt}, {"teacher": tea, "score": y})
  cosent = losses.get("cosent").build(inner, None)({"image": img, "text": txt}, {"score": y}, {}, 0)[0]
  np.testing.assert_allclose(loss, np_disco((img,), (tea,), "sum") + cosent, **TOL)
  np.testing.assert_allclose(metrics["inner/loss"], cosent, **TOL)


# ---------------------------------------------------------------------------------------------------------
# repcon_kd


@pytest.mark.parametrize("n_dev", [1, 8])
def test_repcon_matches_naive(n_dev):
  z0s, z0t, _ = _logits(10, b=8, c=3)
  zgs, zgt, _ = _logits(11, b=8, c=6)
  cfg = losses.loss_config("repcon_kd", weights=(0.3, 1.5), temperature=2.0)
  emb = {"head_0": z0s, "head_generalist": zgs}
  batch = {"teacher_0": z0t, "teacher_generalist": zgt}
  loss, _, (g_emb, _) = _run("repcon_kd", cfg, util.mesh(n_dev), emb, batch)
  ref0 = lambda z: 4.0 * 0.3 * np_kd(z, z0t, 2.0, "kl")
  refg = lambda z: 4.0 * 1.5 * np_kd(z, zgt, 2.0, "kl")
  np.testing.assert_allclose(loss, ref0(z0s) + refg(zgs), **TOL)
  np.testing.assert_allclose(g_emb["head_0"], util.fd_grad(ref0, z0s), **TOL)
  np.testing.assert_allclose(g_emb["head_generalist"], util.fd_grad(refg, zgs), **TOL)


# ---------------------------------------------------------------------------------------------------------
# Bad input.

BAD = [
    ("logit_kd", "temperature", 0.0), ("logit_kd", "temperature", -1.0), ("logit_kd", "mode", "kld"),
    ("logit_kd", "teacher_from", "disk"), ("logit_kd", "weight", -1.0),
    ("sinkd", "kd_temperature", 0.0), ("sinkd", "sinkhorn_temperature", -2.0), ("sinkd", "sinkhorn_epsilon", 0.0),
    ("sinkd", "sinkhorn_epsilon", -0.1), ("sinkd", "sinkhorn_iters", 0), ("sinkd", "sinkhorn_mode", "stable"),
    ("sinkd", "kd_mode", "l1"), ("sinkd", "alpha", 1.5), ("sinkd", "beta", -0.8), ("sinkd", "sinkhorn_scale", -1.0),
    ("sinkd", "anneal_epochs", 0), ("sinkd", "steps_per_epoch", 0),
    ("disco_mse", "reduction", "avg"), ("disco_mse", "teacher_from", "x"), ("disco_mse", "weight", -1.0),
    ("disco_mse", "teachers", ()), ("repcon_kd", "weights", (1.0,)), ("repcon_kd", "temperature", 0.0),
    ("repcon_kd", "mode", "kld"), ("repcon_kd", "teachers", ("t",)),
]


@pytest.mark.parametrize("name,field,value", BAD)
def test_bad_config(name, field, value):
  with pytest.raises(ConfigError, match=f"config.loss.{field}"):
    losses.loss_config(name, **{field: value})


def test_bad_config_lists_allowed_values():
  with pytest.raises(ConfigError, match=r"\('kl', 'reverse_kl', 'js', 'soft_ce', 'mse'\)"):
    losses.loss_config("logit_kd", mode="kld")
  with pytest.raises(ConfigError, match=r"\('plain', 'log'\)"):
    losses.loss_config("sinkd", sinkhorn_mode="exp")


def test_disco_inner_is_validated():
  with pytest.raises(ConfigError, match=r"config\.loss\.inner\.temperature must be"):
    losses.loss_config("disco_mse", inner={"name": "cosent", "temperature": -1.0})


def test_plain_sinkhorn_that_can_underflow_is_rejected():
  # ε = 0.01: exp(−W/ε) reaches exp(−200), zero in float32, and the plain iteration gives NaN (see
  # test_log_sinkhorn_safe_where_plain_underflows); the log mode computes the same distance safely.
  with pytest.raises(ConfigError, match=r"config\.loss\.sinkhorn_epsilon=0\.01 with sinkhorn_mode='plain'.*"
                                        r"sinkhorn_mode='log'"):
    losses.loss_config("sinkd", sinkhorn_epsilon=0.01, sinkhorn_temperature=1.0)
  losses.loss_config("sinkd", sinkhorn_epsilon=0.01, sinkhorn_mode="log")
  losses.loss_config("sinkd", sinkhorn_epsilon=0.025)  # 2/ε = 80: exp(−80) is still a normal float32


def test_bad_shapes():
  kd = losses.get("logit_kd").build(losses.loss_config("logit_kd"), None)
  with pytest.raises(ValueError, match=r"batch\['teacher_logits'\] must be \[4, 3\]"):
    kd({"logits": jnp.ones((4, 3))}, {"teacher_logits": jnp.ones((4, 5))}, {}, 0)
  with pytest.raises(ValueError, match="batch has no 'teacher_logits'"):
    kd({"logits": jnp.ones((4, 3))}, {}, {}, 0)
  sinkd = losses.get("sinkd").build(losses.loss_config("sinkd"), None)
  with pytest.raises(ValueError, match=r"batch\['label'\] must be \[4\]"):
    sinkd({"logits": jnp.ones((4, 3))}, {"teacher_logits": jnp.ones((4, 3)), "label": jnp.ones(3, int)}, {}, 0)
  disco = losses.get("disco_mse").build(losses.loss_config("disco_mse"), None)
  with pytest.raises(ValueError, match=r"batch\['teacher'\] must be \[4, 3\]"):
    disco({"student": jnp.ones((4, 3))}, {"teacher": jnp.ones((4, 8))}, {}, 0)


def test_defaults_follow_the_reference():
  cfg = losses.loss_config("sinkd")
  sinkhorn = (cfg.sinkhorn_temperature, cfg.sinkhorn_epsilon, cfg.sinkhorn_iters, cfg.sinkhorn_scale)
  assert sinkhorn == (2.0, 0.1, 20, 1e-3)
  assert cfg.beta == 0.8 and not cfg.t2_factor and cfg.sinkhorn_mode == "plain"
  assert losses.loss_config("disco_mse").reduction == "sum"
  assert math.isclose(losses.loss_config("logit_kd").temperature, 1.0)
