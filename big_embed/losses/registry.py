"""Registry of losses selectable by name from a config (`config.loss.name`), and loss configs from partial ones.

A loss is built from its resolved sub-config, the device mesh and the static text task type of its batches, then
called as

    loss, metrics = loss_fn(emb, batch, loss_params, step)

* `emb`: dict of tower outputs, e.g. {"image": [B_g, D], "text": [B_g, D]}, float32, L2-normalised,
  global arrays with the batch dim sharded over the mesh's batch axes.
* `batch`: the global batch dict the towers were applied to (ids, labels, masks, ... for losses that need them).
* `loss_params`: learnable loss parameters (e.g. {"logit_scale": t}), created by `init_params`.
* `step`: int32 scalar, the optimizer step (for schedules).
* returns a float32 scalar and a flat dict of float32 scalars for logging.

Recipes write partial loss configs (`config_utils.loss("clip", temperature=0.05)`); `resolve` fills in the loss's
defaults, merges nested groups field by field, resolves sub-loss fields (a wrapper's `inner`) by their own `name`
and validates the result. Every problem is a `ConfigError` naming the field, e.g. `config.loss.inner.tile_size`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any, Callable

import jax
import ml_collections

from big_embed.errors import ConfigError

LossFn = Callable[[dict, dict, dict, jax.Array], tuple[jax.Array, dict]]
Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How to configure, initialise and build one named loss."""

  name: str
  # build(cfg, mesh, task=None) -> loss_fn; `task` is the static text task type of the batches (None: image-text).
  build: Callable[..., LossFn]
  default_config: Callable[[], dict[str, Any]]
  init_params: Callable[[Config], dict] = lambda cfg: {}
  # Applied to the loss params after every optimizer update (e.g. the CLIP temperature clamp).
  clamp_params: Callable[[Config, dict], dict] = lambda cfg, p: p
  # Raises ConfigError naming the bad field; called by `resolve`, before anything compiles.
  validate: Callable[[Config], None] = lambda cfg: None
  # The text task types (config_schema.TASK_TYPES) the loss trains on; None: those of its `inner` loss.
  task_types: tuple[str, ...] | None = ("retrieval",)
  # Fields that hold another loss's config (resolved by its own name; None where optional and absent).
  sub_losses: tuple[str, ...] = ()


_REGISTRY: dict[str, LossSpec] = {}
_WHERE = contextvars.ContextVar("big_embed_loss_config_path", default="config.loss")


def register(spec: LossSpec) -> LossSpec:
  if spec.name in _REGISTRY:
    raise ValueError(f"loss {spec.name!r} is registered twice")
  _REGISTRY[spec.name] = spec
  return spec


def get(name: str) -> LossSpec:
  if name not in _REGISTRY:
    raise ConfigError(f"unknown loss {name!r}; {_WHERE.get()}.name must be one of: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------------------
# Field paths in error messages.


def field_path(field: str) -> str:
  """The config path of `field` of the loss config being checked, e.g. "config.loss.inner.tile_size"."""
  return f"{_WHERE.get()}.{field}"


@contextlib.contextmanager
def nested(field: str):
  """Checks inside name their fields under `field` (a sub-loss or a group of fields)."""
  token = _WHERE.set(field_path(field))
  try:
    yield
  finally:
    _WHERE.reset(token)


def _show(value: Any) -> str:
  """A one-line repr (a ConfigDict's own repr spans lines)."""
  return repr(value.to_dict() if isinstance(value, Config) else value)


def _suggest(name: str, known) -> str:
  close = difflib.get_close_matches(name, list(known), n=1)
  return f"; did you mean {close[0]!r}?" if close else f"; its fields: {', '.join(sorted(known))}"


def _set(target: Config, field: str, value: Any, what: str) -> None:
  if field not in target:
    raise ConfigError(f"{field_path(field)} is not a field of {what}{_suggest(field, target)}")
  try:
    target[field] = value
  except TypeError:
    raise ConfigError(f"{field_path(field)}={_show(value)} has the wrong type; {what} expects a "
                      f"{type(target[field]).__name__} (default {target[field]!r})") from None


# ------------------------------------------------------------------------------------------------
# Resolving partial configs.


def resolve(cfg: Mapping | Config) -> Config:
  """The complete, validated loss config of the partial config `cfg` (`{name, ...fields a recipe sets}`).

  The loss's defaults are overridden by the given fields; a group of fields (a ConfigDict default, e.g. hybrid's
  `retrieval`) is merged field by field; sub-loss fields (`LossSpec.sub_losses`) are resolved by their own
  `name`. Resolving a complete config gives the same config.

  Raises:
    ConfigError: an unknown loss name or field (with the closest field), a value of the wrong type, or a value
      the loss's `validate` rejects; the message names the field's path.
  """
  if not isinstance(cfg, (Mapping, Config)) or "name" not in cfg:
    raise ConfigError(f"{_WHERE.get()} must be a loss config with a `name`, e.g. config_utils.loss('clip'); "
                      f"got {_show(cfg)}")
  spec = get(cfg["name"])
  what = f"loss {spec.name!r}"
  out = Config({"name": spec.name, **spec.default_config()})
  for field, value in cfg.items():
    if field == "name":
      continue
    if field in out and isinstance(out[field], Config) and field not in spec.sub_losses:
      if not isinstance(value, (Mapping, Config)):
        raise ConfigError(f"{field_path(field)} must be a group of fields ({', '.join(out[field])}), "
                          f"got {_show(value)}")
      with nested(field):
        for sub_field, sub_value in value.items():
          _set(out[field], sub_field, sub_value, f"the {field!r} group of {what}")
    else:
      _set(out, field, value, what)
  for field in spec.sub_losses:
    if out[field] is not None:
      with nested(field):
        out[field] = resolve(out[field])
  _reject_nan(out, spec.sub_losses)
  try:
    spec.validate(out)
  except (TypeError, ValueError) as err:  # a check met a value of a type it does not expect: the value is wrong
    if isinstance(err, ConfigError):
      raise
    raise ConfigError(f"{_WHERE.get()} of {what} has a value of the wrong kind ({err}); see the loss's fields and "
                      f"their defaults: {_show(Config({'name': spec.name, **spec.default_config()}))}") from None
  return out


def _reject_nan(cfg: Config, sub_losses: tuple[str, ...]) -> None:
  """No loss field (nor one of a group) may be NaN: no check compares it, so it would pass them all."""
  for field, value in cfg.items():
    if isinstance(value, float) and math.isnan(value):
      raise ConfigError(f"{field_path(field)} must be a number, got nan")
    if isinstance(value, Config) and field not in sub_losses:
      with nested(field):
        _reject_nan(value, ())


def loss_config(name: str, **fields) -> Config:
  """`resolve({name, **fields})`: the complete config of loss `name` (for code and tests)."""
  return resolve(Config({"name": name, **fields}))


def task_types(cfg: Mapping | Config) -> tuple[str, ...]:
  """The text task types the loss of `cfg` (partial or resolved) trains on; a wrapper answers for its inner loss."""
  spec = get(cfg["name"])
  if spec.task_types is not None:
    return spec.task_types
  inner = cfg.get("inner") or spec.default_config()["inner"]
  with nested("inner"):
    return task_types(inner)


# ------------------------------------------------------------------------------------------------
# Losses that hold other losses.


def inner_spec(cfg: Config, field: str = "inner", optional: bool = False) -> LossSpec | None:
  """The spec of the sub-loss config `cfg[field]`; None when it is None and `optional`."""
  sub = cfg.get(field)
  if sub is None and optional:
    return None
  if not isinstance(sub, Config) or "name" not in sub:
    raise ConfigError(f"{field_path(field)} must be a loss config with a `name`, e.g. config_utils.loss('clip')"
                      + (" or None" if optional else ""))
  with nested(field):
    return get(sub.name)


def wrapper(name: str, build, default_config, validate=lambda cfg: None, *, task_types=None,
            optional: bool = False) -> LossSpec:
  """Registers a loss whose `inner` field holds another loss's config (None allowed if `optional`).

  Its params, clamp and checks are the inner loss's (params are shared: one `loss_params` dict). `task_types`
  None: the loss trains on whatever its inner loss trains on.
  """

  def validate_all(cfg):
    validate(cfg)
    spec = inner_spec(cfg, optional=optional)
    if spec is not None:
      with nested("inner"):
        spec.validate(cfg.inner)

  def init(cfg):
    spec = inner_spec(cfg, optional=optional)
    return spec.init_params(cfg.inner) if spec else {}

  def clamp(cfg, params):
    spec = inner_spec(cfg, optional=optional)
    return spec.clamp_params(cfg.inner, params) if spec else params

  return register(LossSpec(name=name, build=build, default_config=default_config, init_params=init,
                           clamp_params=clamp, validate=validate_all, task_types=task_types,
                           sub_losses=("inner",)))


def build_inner(cfg: Config, mesh, task=None, optional: bool = False) -> LossFn | None:
  """The built `inner` loss of a wrapper (None if optional and absent)."""
  spec = inner_spec(cfg, optional=optional)
  return None if spec is None else spec.build(cfg.inner, mesh, task)
