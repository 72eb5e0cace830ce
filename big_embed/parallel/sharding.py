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
