"""The sharded train step: 8 fake devices (data and FSDP meshes) vs 1 device, gradients and updates, and sharded
state creation."""

import jax
import numpy as np
import pytest

from big_embed import losses
from big_embed import models
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import optimizer as optimizer_lib
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib
from tests import tiny

VOCAB = 50
MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]


def _random_batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, s, l = cfg.train.batch_size, cfg.model.image_size, cfg.model.max_text_len
  tokens = rng.integers(1, VOCAB, size=(b, l)).astype(np.int32)
  tokens[:, l // 2:] *= rng.integers(0, 2, size=(b, 1)).astype(np.int32)  # some padded texts
  return {"image": rng.integers(0, 256, size=(b, s, s, 3)).astype(np.uint8), "text": tokens}


def _setup(cfg, mesh):
  """(state, step, grad function, batch shardings) of the tiny two-tower model on `mesh`."""
  kind = models.kind_of(cfg.model)
  model = kind.build(cfg.model, VOCAB)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  tx = optimizer_lib.make_optimizer(cfg.train)
  init_fn = state_lib.make_init_fn(model, kind.example_batch(cfg.model), lambda: spec.init_params(loss_cfg), tx,
                                   cfg.seed)
  _, shardings = state_lib.state_shardings(init_fn, mesh, cfg.sharding_rules)
  state = state_lib.create_sharded_state(init_fn, shardings)
  loss_fn = spec.build(loss_cfg, mesh)
  batch_sharding = {"image": mesh_lib.batch_sharding(mesh, 4), "text": mesh_lib.batch_sharding(mesh, 2)}
  step = jax.jit(step_lib.make_train_step(model, loss_fn, lambda p: spec.clamp_params(loss_cfg, p), tx,
                                          optimizer_lib.learning_rate_schedule(cfg.train)),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, mesh_lib.replicated(mesh)))
  grads = jax.jit(step_lib.make_loss_and_grads(model, loss_fn),
                  in_shardings=(shardings.params, batch_sharding, None, None),
                  out_shardings=((mesh_lib.replicated(mesh), mesh_lib.replicated(mesh)), shardings.params))
  return state, step, grads, batch_sharding, shardings


def _run(cfg, mesh, batches):
  state, step, grad_fn, batch_sharding, shardings = _setup(cfg, mesh)
  put = lambda b: {k: jax.device_put(v, batch_sharding[k]) for k, v in b.items()}
  (loss, _), grads = grad_fn(state.params, put(batches[0]), jax.random.PRNGKey(1), 0)
  metrics = []
  for b in batches:
    state, m = step(state, put(b))
    metrics.append(jax.device_get(m))
  return {"loss": float(loss), "grads": jax.device_get(grads), "metrics": metrics,
          "params": jax.device_get(state.params), "shardings": shardings, "state": state}


@pytest.fixture(scope="module")
def setup():
  cfg = tiny.tiny_config()
  cfg.train.warmup_steps = 0  # the first update is a real one (a warmup step has learning rate 0)
  batches = [_random_batch(cfg, i) for i in range(2)]
  one = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  return cfg, batches, _run(cfg, one, batches)


def _assert_trees_close(got, want, rtol, atol):
  """Leaf by leaf, with `atol` relative to the largest |value| of the whole tree: float32 sums in another order
  differ at that scale, and some leaves' true gradient is 0 (an attention key bias: softmax ignores a constant
  shift), so they are float32 noise on both sides."""
  scale = max(float(np.abs(y).max()) for y in jax.tree.leaves(want))
  flat, _ = jax.tree_util.tree_flatten_with_path(got)
  for (path, x), y in zip(flat, jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_step_equals_single_device(setup, mesh_shape):
  cfg, batches, ref = setup
  got = _run(cfg, mesh_lib.make_mesh(mesh_shape), batches)
  # Gradients themselves (Adam would hide a uniform scale such as a missing or doubled 1/devices).
  assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
  _assert_trees_close(got["grads"], ref["grads"], rtol=1e-4, atol=5e-6)
  for m, r in zip(got["metrics"], ref["metrics"]):
    for name in ("loss", "grad_norm", "accuracy", "logit_scale"):
      np.testing.assert_allclose(m[name], r[name], rtol=1e-5, err_msg=name)
  # After the updates: Adam turns float32 noise in a zero true gradient into steps of ±learning_rate, so the
  # parameters agree to about one learning rate per step (the gradients above are the strict check).
  lr = cfg.train.learning_rate
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=len(batches) * lr),
               got["params"], ref["params"])
  # The state was born sharded: FSDP meshes really split the model width.
  if got["shardings"].params["model"] and mesh_shape.get("fsdp", 1) > 1:
    kernel = got["shardings"].params["model"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
    assert "fsdp" in tuple(kernel.spec), kernel.spec
    assert got["state"].params["model"]["image_tower"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"].sharding == kernel


def test_logit_scale_is_clamped_after_update(setup):
  cfg, batches, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.loss.max_logit_scale = 1.0  # any update is clamped back to exp(t) <= 1, i.e. t <= 0
  cfg.loss.temperature = 0.5
  state, step, _, batch_sharding, _ = _setup(cfg, mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  state, _ = step(state, {k: jax.device_put(v, batch_sharding[k]) for k, v in batches[0].items()})
  assert float(state.params["loss"]["logit_scale"]) == 0.0


def test_sharding_rules_come_from_the_config(setup):
  cfg, batches, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sharding_rules = (("mlp", "fsdp"),)  # only MLP widths over fsdp; "embed" dims stay replicated
  _, _, _, _, shardings = _setup(cfg, mesh_lib.make_mesh({"data": 2, "fsdp": 4}))
  mlp = shardings.params["model"]["image_tower"]["encoder"]["block0"]["mlp"]
  assert tuple(mlp["fc1"]["kernel"].spec) == (None, "fsdp")  # [embed, mlp]
  assert tuple(shardings.params["model"]["image_proj"]["kernel"].spec) in ((), (None, None))
