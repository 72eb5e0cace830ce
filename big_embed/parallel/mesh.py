"""Device mesh from the config, and the shardings derived from it."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from big_embed.errors import UserError

# The batch dimension is split over these mesh axes (FSDP shards params over `fsdp` and data over both).
BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")


class MeshError(UserError, ValueError):
  """config.mesh does not fit the devices."""


def resolve_mesh_shape(shape: dict[str, int], num_devices: int) -> dict[str, int]:
  """Fills one `-1` axis with the remaining devices; checks the product equals `num_devices`."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {list(MESH_AXES)}")
  sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"config.mesh: only one axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise MeshError(f"config.mesh: axis sizes must be positive or -1, got {sizes}")
  if free:
    if num_devices % fixed:
      raise MeshError(f"config.mesh: {num_devices} devices do not divide into fixed axes of size {fixed}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(
        f"config.mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are available; "
        "set one axis to -1 to use the rest")
  return sizes


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (or the given) devices with axes ("data", "fsdp", "tensor"), GSPMD-style (Auto) axes."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_mesh_shape(dict(shape), len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(dims, devices=devices)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices).reshape(dims)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_size_per_shard(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading dim over the batch axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
