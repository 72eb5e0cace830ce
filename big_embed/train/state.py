"""The train state (params, optimizer state, step, RNG), created already sharded over the mesh."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from big_embed.parallel import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer updates done
  params: dict  # {"model": ..., "loss": ...}
  opt_state: optax.OptState
  rng: jax.Array  # uint32 [2] raw PRNG key data


def make_init_fn(model: nn.Module, example_batch: dict, loss_init: Callable[[], dict],
                 tx: optax.GradientTransformation, seed: int):
  """init() -> TrainState whose model params are still `nn.Partitioned`-boxed (logical names)."""

  def init():
    rng = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(rng)
    params = {"model": model.init(init_rng, example_batch)["params"], "loss": loss_init()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)

  return init


def state_shardings(init_fn, mesh: Mesh, rules: sharding_lib.Rules) -> tuple[Any, Any]:
  """(abstract unboxed state, matching NamedSharding tree) without allocating anything; `rules` map the params'
  logical axes to mesh axes (`config.sharding_rules`). The optimizer state follows the params it mirrors."""
  boxed = jax.eval_shape(init_fn)
  shardings = sharding_lib.shardings_from_boxed(boxed, mesh, rules)
  return nn.unbox(boxed), shardings


def create_sharded_state(init_fn, shardings) -> TrainState:
  """Runs init under jit with the state's shardings as out_shardings: every leaf is born in place."""
  return jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
