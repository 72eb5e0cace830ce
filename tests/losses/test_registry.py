"""The loss registry: partial configs resolved (defaults, groups, sub-losses, one-line errors), task types, and a loss
added as one new module, found by the package's module scan, checked through the registry and trained one step."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import big_embed.losses
from big_embed import config_schema, config_utils, losses
from big_embed.errors import ConfigError
from big_embed.losses import registry
from tests.losses import util

RECIPES = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.py"))


@pytest.mark.parametrize("name", losses.names())
def test_resolve_fills_defaults_and_is_idempotent(name):
  cfg = losses.resolve(config_utils.loss(name))
  assert cfg.name == name
  defaults = losses.get(name).default_config()
  assert set(cfg) == {"name", *defaults}
  assert losses.resolve(cfg) == cfg
  assert losses.resolve(cfg.to_dict()) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loss_resolves(recipe):
  partial = config_utils.load_recipe(recipe).loss
  cfg = losses.resolve(partial)
  for field, value in partial.items():  # what the recipe set survives
    if isinstance(value, ml_collections.ConfigDict):
      assert all(cfg[field][k] == v for k, v in value.items() if not isinstance(v, ml_collections.ConfigDict))
    else:
      assert cfg[field] == value, field
  assert set(losses.task_types(partial)) <= set(config_schema.TASK_TYPES)


def test_sub_losses_resolve_by_their_own_name():
  cfg = losses.resolve(config_utils.loss("matryoshka", inner=config_utils.loss("cosent", weight=0.5)))
  assert cfg.inner.name == "cosent" and cfg.inner.weight == 0.5 and cfg.inner.temperature == 0.05
  assert losses.task_types(cfg) == ("sts",)  # a wrapper answers for its inner loss
  assert losses.task_types(config_utils.loss("matryoshka")) == ("retrieval",)  # the default inner: clip
  assert losses.task_types(config_utils.loss("dexml")) == ("multilabel",)
  disco = losses.resolve(config_utils.loss("disco_mse"))
  assert disco.inner is None and losses.task_types(disco) == ("retrieval",)
  nested = losses.resolve(config_utils.loss("similarity_kd", inner=config_utils.loss("sinkd", sinkhorn_mode="log")))
  assert nested.inner.sinkhorn_mode == "log" and nested.inner.kd_temperature == 2.0


@pytest.mark.parametrize("cfg,message", [
    (config_utils.loss("clip", tile_sise=3),
     r"^config\.loss\.tile_sise is not a field of loss 'clip'; did you mean 'tile_size'\?$"),
    (config_utils.loss("matryoshka", inner=config_utils.loss("clip", tile_sise=3)),
     r"^config\.loss\.inner\.tile_sise is not a field of loss 'clip'; did you mean 'tile_size'\?$"),
    (config_utils.loss("clipp"), r"^unknown loss 'clipp'; config\.loss\.name must be one of: clip, cosent, "),
    (config_utils.loss("clip", learnable_temperature="yes"),
     r"^config\.loss\.learnable_temperature='yes' has the wrong type; loss 'clip' expects a bool"),
    (config_utils.loss("clip", temperature=-0.07), r"^config\.loss\.temperature must be a finite number > 0"),
    (config_utils.loss("matryoshka", inner=config_utils.loss("clip", temperature=0.0)),
     r"^config\.loss\.inner\.temperature must be a finite number > 0"),
    (ml_collections.ConfigDict({"temperature": 0.1}), r"^config\.loss must be a loss config with a `name`"),
])
def test_problems_are_one_line_config_errors(cfg, message):
  with pytest.raises(ConfigError, match=message) as err:
    losses.resolve(cfg)
  assert "\n" not in str(err.value)


def test_resolve_does_not_change_its_input():
  partial = config_utils.loss("hybrid", sts=dict(weight=0.1))
  before = partial.to_dict()
  losses.resolve(partial)
  assert partial.to_dict() == before


# ------------------------------------------------------------------------------------------------
# A loss added as one new module.

TOY = '''"""A toy loss in its own module: mean_i softplus(−κ · a_i·b_i), κ = 1/temperature (learnable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import registry


def _default_config():
  return dict(towers=("image", "text"), **common.scale_fields(0.5, True, max_logit_scale=4.0))


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)


def _build(cfg, mesh, task=None):
  del mesh, task

  def loss_fn(emb, batch, loss_params, step):
    del batch, step
    kappa = common.logit_scale(cfg, loss_params)
    a, b = (emb[k] for k in cfg.towers)
    loss = jnp.mean(jax.nn.softplus(-kappa * jnp.sum(a * b, axis=-1)))
    return loss, {"loss": loss, "logit_scale": kappa}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="toy_alignment", build=_build, default_config=_default_config, init_params=common.init_scale,
    clamp_params=common.clamp_scale, validate=_validate))
'''


@pytest.fixture
def toy_loss(tmp_path, monkeypatch):
  """The package scan imports a module written to a directory on the package's path; undone afterwards."""
  (tmp_path / "toy_alignment.py").write_text(TOY)
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
  monkeypatch.setattr(big_embed.losses, "__path__", [*big_embed.losses.__path__, str(tmp_path)])
  assert "toy_alignment" not in losses.names()
  losses.import_loss_modules()
  yield "toy_alignment"
  sys.modules.pop("big_embed.losses.toy_alignment", None)


def _naive_toy(emb, params):
  """mean_i log(1 + exp(−κ a_i·b_i)), a loop over the rows."""
  kappa = jnp.exp(params["logit_scale"])
  rows = [jnp.log1p(jnp.exp(-kappa * jnp.dot(emb["image"][i], emb["text"][i]))) for i in range(len(emb["image"]))]
  return sum(rows) / len(rows)


def _tiny_two_tower():
  from big_embed.models.two_tower import TwoTower  # pylint: disable=g-import-not-at-top
  c = config_schema.model_defaults("two_tower")
  c.update(dict(image_size=8, patch_size=4, max_text_len=4, embed_dim=8))
  for tower in (c.vision, c.text):
    tower.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32))
  return TwoTower(c, vocab_size=16)


def test_a_loss_in_a_new_module_is_registered_checked_and_trained(toy_loss):
  from big_embed.train.state import TrainState  # pylint: disable=g-import-not-at-top
  from big_embed.train.step import make_train_step  # pylint: disable=g-import-not-at-top
  assert toy_loss in losses.names()
  cfg = losses.resolve(config_utils.loss(toy_loss, temperature=0.25))
  assert (cfg.temperature, cfg.learnable_temperature, cfg.max_logit_scale) == (0.25, True, 4.0)
  assert losses.task_types(cfg) == ("retrieval",)
  spec = losses.get(toy_loss)
  np.testing.assert_allclose(np.exp(spec.init_params(cfg)["logit_scale"]), 4.0, rtol=1e-6)

  _, a, t = util.pairs(100, b=8)
  for n in (1, 8):
    util.check(toy_loss, n, {"image": a, "text": t}, {}, _naive_toy, params={"logit_scale": jnp.float32(0.3)},
               temperature=0.25)

  # One train step of a tiny two-tower model: the loss's gradient moves the model and t, then t is clamped to
  # [0, log max_logit_scale]: inside [0, log 100] the step stands; with max_logit_scale = 1 it is undone.
  model = _tiny_two_tower()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, size=(4, 8, 8, 3)).astype(np.uint8),
           "text": rng.integers(1, 16, size=(4, 4)).astype(np.int32)}
  model_params = model.init(jax.random.PRNGKey(0), batch)["params"]
  tx = optax.sgd(0.5)
  for temperature, max_logit_scale in ((0.25, 100.0), (1.0, 1.0)):
    cfg = losses.loss_config(toy_loss, temperature=temperature, max_logit_scale=max_logit_scale)
    params = {"model": model_params, "loss": spec.init_params(cfg)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
    step = make_train_step(model, spec.build(cfg, None), lambda p, cfg=cfg: spec.clamp_params(cfg, p), tx,
                           lambda s: jnp.float32(0.5))
    new_state, metrics = jax.jit(step)(state, batch)

    def direct(p):
      return _naive_toy(model.apply({"params": p["model"]}, batch), p["loss"])

    want, grads = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    t = float(params["loss"]["logit_scale"] - 0.5 * grads["loss"]["logit_scale"])
    assert abs(t - float(params["loss"]["logit_scale"])) > 1e-5  # the step moves t ...
    want_t = min(t, np.log(max_logit_scale)) if t > 0 else 0.0  # ... and the clamp keeps it in [0, log max]
    np.testing.assert_allclose(new_state.params["loss"]["logit_scale"], want_t, rtol=1e-6, atol=1e-7)
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), new_state.params["model"], model_params)
    assert max(jax.tree.leaves(moved)) > 0 and int(new_state.step) == 1
