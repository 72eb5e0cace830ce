"""Registry of losses selectable by name from a config (`config.loss.name`).

A loss is built from its own sub-config and the device mesh and then called as

    loss, metrics = loss_fn(emb, batch, loss_params, step)

* `emb`: dict of tower outputs, e.g. {"image": [B_g, D], "text": [B_g, D]}, float32, L2-normalised,
  global arrays with the batch dim sharded over the mesh's batch axes.
* `batch`: the global batch dict the towers were applied to (ids, labels, masks, ... for losses that need them).
* `loss_params`: learnable loss parameters (e.g. {"logit_scale": t}), created by `init_params`.
* `step`: int32 scalar, the optimizer step (for schedules).
* returns a float32 scalar and a flat dict of float32 scalars for logging.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

LossFn = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How to configure, initialise and build one named loss."""

  name: str
  build: Callable[[ml_collections.ConfigDict, jax.sharding.Mesh], LossFn]
  default_config: Callable[[], dict[str, Any]]
  init_params: Callable[[ml_collections.ConfigDict], dict] = lambda cfg: {}
  # Applied to the loss params after every optimizer update (e.g. the CLIP temperature clamp).
  clamp_params: Callable[[ml_collections.ConfigDict, dict], dict] = lambda cfg, p: p
  # Raises ValueError naming the bad field; called before anything compiles.
  validate: Callable[[ml_collections.ConfigDict], None] = lambda cfg: None


_REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
  if spec.name in _REGISTRY:
    raise ValueError(f"loss {spec.name!r} is registered twice")
  _REGISTRY[spec.name] = spec
  return spec


def get(name: str) -> LossSpec:
  if name not in _REGISTRY:
    raise ValueError(
        f"unknown loss {name!r}; config.loss.name must be one of: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def loss_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The sub-config `config.loss` for loss `name`: its defaults, then `overrides`."""
  spec = get(name)
  fields = dict(spec.default_config())
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"loss {name!r} has no field(s) {sorted(unknown)}; known: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict({"name": name, **fields})


def inner_spec(cfg: ml_collections.ConfigDict) -> LossSpec:
  """The spec of a wrapper loss's `cfg.inner` sub-config (matryoshka, similarity_kd)."""
  if not isinstance(cfg.get("inner"), ml_collections.ConfigDict) or "name" not in cfg.inner:
    raise ValueError("config.loss.inner must be a loss sub-config with a `name`, e.g. loss_config('clip')")
  return get(cfg.inner.name)


def wrapper(name: str, build, default_config, validate=lambda cfg: None) -> LossSpec:
  """Registers a loss that wraps `cfg.inner`: its params, clamp and validation are the inner loss's."""

  def validate_all(cfg):
    validate(cfg)
    inner_spec(cfg).validate(cfg.inner)

  return register(LossSpec(
      name=name, build=build, default_config=default_config,
      init_params=lambda cfg: inner_spec(cfg).init_params(cfg.inner),
      clamp_params=lambda cfg, p: inner_spec(cfg).clamp_params(cfg.inner, p),
      validate=validate_all))
