"""similarity_kd: logit distillation over in-batch similarity rows, against a direct NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.errors import ConfigError
from big_embed.parallel.mesh import batch_sharding
from tests.losses import util


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _naive_kl(a, b, ta, tb, scale, temperature):
  """mean_i KL(softmax(T_i / t) || softmax(S_i / t)) with S = scale·a bᵀ, T = scale·ta tbᵀ (float64)."""
  s = scale * a.astype(np.float64) @ b.T.astype(np.float64) / temperature
  t = scale * ta.astype(np.float64) @ tb.T.astype(np.float64) / temperature
  lt, ls = _log_softmax(t), _log_softmax(s)
  return float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)))


@pytest.mark.parametrize("devices", [1, 8])
def test_value_and_gradient_match_reference(devices):
  rng = np.random.default_rng(0)
  b, d = 16, 8
  a, bb, ta, tb = (_unit(rng, (b, d)) for _ in range(4))
  cfg = losses.loss_config("similarity_kd", temperature=0.1,
                           inner=losses.loss_config("logit_kd", mode="kl", temperature=2.0))
  spec = losses.get("similarity_kd")
  spec.validate(cfg)
  mesh = util.mesh(devices)
  fn = spec.build(cfg, mesh)
  put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))

  def f(a_, b_):
    return fn({"image": a_, "text": b_}, {"teacher_image": put(ta), "teacher_text": put(tb)}, {}, 0)[0]

  value, (ga, gb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(put(a), put(bb))
  np.testing.assert_allclose(value, _naive_kl(a, bb, ta, tb, 10.0, 2.0), rtol=1e-5, atol=1e-6)
  eps = 1e-3  # central differences of the float64 reference along random directions
  for g, which in ((ga, 0), (gb, 1)):
    direction = rng.normal(size=(b, d))
    args = [a.astype(np.float64), bb.astype(np.float64)]
    plus, minus = list(args), list(args)
    plus[which] = args[which] + eps * direction
    minus[which] = args[which] - eps * direction
    numeric = (_naive_kl(*plus, ta, tb, 10.0, 2.0) - _naive_kl(*minus, ta, tb, 10.0, 2.0)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(g) * direction), numeric, rtol=1e-4, atol=1e-5)


def test_missing_teacher_is_a_clear_error():
  cfg = losses.loss_config("similarity_kd")
  fn = losses.get("similarity_kd").build(cfg, util.mesh(1))
  x = jnp.ones((4, 3)) / np.sqrt(3)
  with pytest.raises(ValueError, match="config.teacher.workdir"):
    fn({"image": x, "text": x}, {}, {}, 0)


def test_bad_fields_are_rejected():
  with pytest.raises(ConfigError, match=r"config\.loss\.temperature"):
    losses.loss_config("similarity_kd", temperature=0.0)
  with pytest.raises(ConfigError, match=r"config\.loss\.teacher_keys"):
    losses.loss_config("similarity_kd", teacher_keys=("t",))
  with pytest.raises(ConfigError, match=r"config\.loss\.inner\.mode"):
    losses.loss_config("similarity_kd", inner={"name": "logit_kd", "mode": "l2"})


def test_default_temperature_is_the_old_fixed_scale_20():
  rng = np.random.default_rng(1)
  a, bb, ta, tb = (_unit(rng, (8, 4)) for _ in range(4))
  fn = losses.get("similarity_kd").build(losses.loss_config("similarity_kd"), None)
  value = fn({"image": a, "text": bb}, {"teacher_image": ta, "teacher_text": tb}, {}, 0)[0]
  np.testing.assert_allclose(value, _naive_kl(a, bb, ta, tb, 20.0, 1.0), rtol=1e-5, atol=1e-6)
