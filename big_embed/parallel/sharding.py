"""Parameter shardings from logical axis names (`nn.with_logical_partitioning`) and mesh rules.

The rules are data in the config (`config.sharding_rules`, default `config_schema.SHARDING_RULES`): pairs
(logical axis, mesh axis or None), e.g. ("embed", "fsdp") shards every "embed" dimension over the fsdp axis.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_embed.errors import ConfigError
from big_embed.parallel.mesh import BATCH_AXES

Rules = Sequence[Sequence[str | None]]


def check_rules(rules: Rules, mesh: Mesh) -> None:
  """Raises ConfigError unless `rules` are (logical axis, mesh axis of `mesh` or None) pairs."""
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str) or not (rule[1] is None or rule[1] in mesh.axis_names):
      raise ConfigError(f"config.sharding_rules has {tuple(rule)!r}; each rule is (logical axis, one of "
                        f"{tuple(mesh.axis_names)} or None)")


def _spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """Maps logical names to mesh axes; a dim that an axis does not divide stays replicated."""
  table = dict(rules)
  used = set()
  spec = []
  for name, size in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def shardings_from_boxed(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """A tree of NamedShardings shaped like `nn.unbox(boxed_tree)`.

  `boxed_tree` is an abstract tree (from `jax.eval_shape`) whose leaves may be `nn.Partitioned` boxes
  (logical names) or plain arrays (replicated).
  """

  def leaf_sharding(x):
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, _spec_for(x.names, x.value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(leaf_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` [B, ...] split over the batch axes of the mesh the step is traced under (`jax.set_mesh`), else as is.

  The towers' blocks call it on their input and output (`models.layers.apply_stack`): under FSDP the
  compiler otherwise follows the weights' "embed" sharding into the activations and keeps the batch whole on
  every device (a ViT-B/16-size CLIP at batch 4,096 on 64 devices: 72.8 GB of temporaries per device with
  fsdp = 64 instead of 2.2 GB; README, `--mode compile`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in BATCH_AXES if not mesh.empty and a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(axes))
