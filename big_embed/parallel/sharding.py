"""Parameter shardings from logical axis names (`nn.with_logical_partitioning`) and mesh rules."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical axis -> mesh axis. FSDP shards the model width; tensor parallelism the MLP, heads and vocabulary.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
)


def _spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
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


def shardings_from_boxed(boxed_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """A tree of NamedShardings shaped like `nn.unbox(boxed_tree)`.

  `boxed_tree` is an abstract tree (from `jax.eval_shape`) whose leaves may be `nn.Partitioned` boxes
  (logical names) or plain arrays (replicated).
  """

  def leaf_sharding(x):
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, _spec_for(x.names, x.value.shape, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree.map(leaf_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
