"""The sharded train step: 8 fake devices (data and FSDP meshes) vs 1 device, and sharded state creation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.models import two_tower
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import optimizer as optimizer_lib
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib
from tests import tiny

VOCAB = 50


def _random_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, s, l = cfg.train.batch_size, cfg.model.image_size, cfg.model.max_text_len
  tokens = rng.integers(1, VOCAB, size=(b, l)).astype(np.int32)
  tokens[:, l // 2:] *= rng.integers(0, 2, size=(b, 1)).astype(np.int32)  # some padded texts
  return {"image": rng.integers(0, 256, size=(b, s, s, 3)).astype(np.uint8), "text": tokens}


def _run_steps(cfg, mesh, batches):
  model = two_tower.build_model(cfg.model, VOCAB)
  spec = losses.get(cfg.loss.name)
  tx = optimizer_lib.make_optimizer(cfg.train)
  m = cfg.model
  example = {"image": jnp.zeros((1, m.image_size, m.image_size, 3), jnp.uint8),
             "text": jnp.zeros((1, m.max_text_len), jnp.int32)}
  init_fn = state_lib.make_init_fn(model, example, lambda: spec.init_params(cfg.loss), tx, cfg.seed)
  _, shardings = state_lib.state_shardings(init_fn, mesh)
  state = state_lib.create_sharded_state(init_fn, shardings)
  batch_sharding = {"image": mesh_lib.batch_sharding(mesh, 4), "text": mesh_lib.batch_sharding(mesh, 2)}
  step = jax.jit(step_lib.make_train_step(model, spec.build(cfg.loss, mesh),
                                          lambda p: spec.clamp_params(cfg.loss, p), tx,
                                          optimizer_lib.learning_rate_schedule(cfg.train)),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, mesh_lib.replicated(mesh)))
  metrics = []
  for b in batches:
    state, m_ = step(state, {k: jax.device_put(v, batch_sharding[k]) for k, v in b.items()})
    metrics.append(jax.device_get(m_))
  return state, metrics, shardings


@pytest.fixture(scope="module")
def setup():
  cfg = tiny.tiny_config()
  batches = [_random_batch(cfg, i) for i in range(2)]
  one = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  ref_state, ref_metrics, _ = _run_steps(cfg, one, batches)
  return cfg, batches, jax.device_get(ref_state), ref_metrics


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_step_equals_single_device(setup, mesh_shape):
  cfg, batches, ref_state, ref_metrics = setup
  mesh = mesh_lib.make_mesh(mesh_shape)
  state, metrics, shardings = _run_steps(cfg, mesh, batches)
  for m, r in zip(metrics, ref_metrics):
    np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5, atol=1e-6)
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))
  ref_flat = jax.tree.leaves(ref_state.params)
  for (path, x), y in zip(flat, ref_flat):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))
  # The state was born sharded: FSDP meshes really split the model width.
  if mesh.shape["fsdp"] > 1:
    kernel = shardings.params["model"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in tuple(kernel.spec), kernel.spec
    assert state.params["model"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"].sharding == kernel


def test_logit_scale_is_clamped_after_update(setup):
  cfg, batches, _, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.loss.max_logit_scale = 1.0  # any update is clamped back to exp(t) <= 1, i.e. t <= 0
  cfg.loss.temperature_init = 0.5
  state, _, _ = _run_steps(cfg, mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]), batches[:1])
  assert float(state.params["loss"]["logit_scale"]) == 0.0
