"""Shared pieces of the losses: config fields and checks, the logit scale, inputs, and the engine-loss builder.

Config checks raise `ConfigError` naming the field (`config.loss.<field>`, or its path inside a sub-loss) and the
allowed range; they run in `LossSpec.validate` when the config is resolved, before anything compiles. Input
checks (`array`, `pair_inputs`) run when the loss is traced and name the `emb` / `batch` key.

Every loss with a logit scale κ uses the same three fields (`scale_fields`):

    temperature            τ, κ = 1/τ: fixed, or the initial value of the learnable param t = log(1/τ), κ = exp(t)
    learnable_temperature  bool
    max_logit_scale        after every optimizer update t is clamped to [0, log max_logit_scale]; inf = no clamp
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from big_embed.errors import ConfigError
from big_embed.losses import engine
from big_embed.losses import registry


def engine_fields(key_mode: str = "gather") -> dict:
  """Config fields of every engine-based loss."""
  return dict(
      tile_size=1024,     # key columns per tile: memory O(B_local × tile_size); results do not depend on it
      key_mode=key_mode,  # "gather" (all-gather keys) | "ring" (ppermute ring) | "local" (own shard only)
  )


def scale_fields(temperature: float, learnable: bool, max_logit_scale: float = 100.0) -> dict:
  """The logit-scale fields (module docstring) with a loss's defaults."""
  return dict(temperature=temperature, learnable_temperature=learnable, max_logit_scale=max_logit_scale)


# ------------------------------------------------------------------------------------------------
# Checks.


def check_positive(cfg, field: str):
  v = cfg[field]
  if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
    raise ConfigError(f"{registry.field_path(field)} must be a finite number > 0, got {v!r}")


def check_range(cfg, field: str, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
  """lo <= v <= hi (or strict with *_open); None = unbounded."""
  v = cfg[field]
  kind = (numbers.Integral,) if integer else (numbers.Real,)
  ok = isinstance(v, kind) and not isinstance(v, bool) and not (isinstance(v, float) and math.isnan(v))
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    lb = "(-inf" if lo is None else ("(" if lo_open else "[") + str(lo)
    ub = "inf)" if hi is None else str(hi) + (")" if hi_open else "]")
    what = "an int" if integer else "a number"
    raise ConfigError(f"{registry.field_path(field)} must be {what} in {lb}, {ub}, got {v!r}")


def check_choice(cfg, field: str, choices):
  if cfg[field] not in choices:
    raise ConfigError(f"{registry.field_path(field)} must be one of {tuple(choices)}, got {cfg[field]!r}")


def check_bool(cfg, field: str):
  if not isinstance(cfg[field], (bool, np.bool_)):
    raise ConfigError(f"{registry.field_path(field)} must be True or False, got {cfg[field]!r}")


def check_key(cfg, *fields: str):
  """Each field names an emb / batch key: a non-empty str."""
  for field in fields:
    if not (isinstance(cfg[field], str) and cfg[field]):
      raise ConfigError(f"{registry.field_path(field)} must be a non-empty emb or batch key, got {cfg[field]!r}")


def check_towers(cfg, field: str = "towers", n: int = 2):
  towers = tuple(cfg[field])
  if len(towers) != n or not all(isinstance(t, str) and t for t in towers) or len(set(towers)) != n:
    raise ConfigError(f"{registry.field_path(field)} must be {n} distinct emb keys, got {towers!r}")


def check_same_length(cfg, a: str, b: str):
  """cfg[a] and cfg[b] are non-empty and of equal length (e.g. student and teacher keys)."""
  if not cfg[a] or len(cfg[a]) != len(cfg[b]):
    raise ConfigError(f"{registry.field_path(a)} and {registry.field_path(b)} must be non-empty and of equal "
                      f"length, got {tuple(cfg[a])} and {tuple(cfg[b])}")


def check_engine(cfg):
  check_range(cfg, "tile_size", lo=1, integer=True)
  check_choice(cfg, "key_mode", engine.KEY_MODES)


def check_scale(cfg):
  check_positive(cfg, "temperature")
  check_bool(cfg, "learnable_temperature")
  check_range(cfg, "max_logit_scale", lo=1.0)


# ------------------------------------------------------------------------------------------------
# The logit scale.


def init_scale(cfg) -> dict:
  """{"logit_scale": t = log(1/temperature)} for a learnable temperature, else {} (κ = 1/τ is fixed)."""
  if not cfg.learnable_temperature:
    return {}
  return {"logit_scale": jnp.asarray(np.log(1.0 / cfg.temperature), jnp.float32)}


def clamp_scale(cfg, params: dict) -> dict:
  """t clamped to [0, log max_logit_scale] (open_clip); unchanged without the param or with max = inf."""
  if "logit_scale" not in params or math.isinf(cfg.max_logit_scale):
    return params
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, np.log(cfg.max_logit_scale))}


def logit_scale(cfg, params: dict) -> jax.Array:
  """κ in float32: exp(params["logit_scale"]) when learnable, else 1/temperature."""
  if cfg.learnable_temperature:
    return jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32))
  return jnp.asarray(1.0 / cfg.temperature, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Inputs.


def array(table: dict, key: str, where: str, shape=None, ndim=None, required=True):
  """table[key] as an array, checked against `shape` (None entries are free) or `ndim`."""
  if key not in table or table[key] is None:
    if required:
      raise ValueError(f"{where} has no {key!r} (keys: {sorted(table)})")
    return None
  x = jnp.asarray(table[key])
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{where}[{key!r}] must have {ndim} dims, got shape {x.shape}")
  if shape is not None and (x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape))):
    want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
    raise ValueError(f"{where}[{key!r}] must be {want}, got shape {x.shape}")
  return x


def source(emb: dict, batch: dict, name: str) -> tuple[dict, str]:
  """(table, its name) of a `teacher_from`-style field: "emb" or "batch"."""
  return (emb, "emb") if name == "emb" else (batch, "batch")


def pair_inputs(cfg, emb: dict, batch: dict, ids: bool = True, key_mask: bool = False) -> dict:
  """Two towers' embeddings [B, D] (float32) with optional batch["valid"] [B], batch["ids"] [B] and
  batch["key_mask"] [B, B] (also transposed, "key_mask_t", for the reverse direction)."""
  a_key, b_key = cfg.towers
  a = array(emb, a_key, "emb", ndim=2).astype(jnp.float32)
  b = array(emb, b_key, "emb", shape=a.shape).astype(jnp.float32)
  n = a.shape[0]
  out = {"a": a, "b": b}
  valid = array(batch, "valid", "batch", shape=(n,), required=False)
  if valid is not None:
    out["valid"] = valid.astype(bool)
  if ids:
    i = array(batch, "ids", "batch", shape=(n,), required=False)
    if i is not None:
      out["ids"] = i.astype(jnp.int32)
  if key_mask:
    m = array(batch, "key_mask", "batch", shape=(n, n), required=False)
    if m is not None:
      out["key_mask"] = m.astype(bool)
      out["key_mask_t"] = m.astype(bool).T
  return out


# ------------------------------------------------------------------------------------------------
# The engine-based losses: scale -> shard_map(local rows) -> metrics.


def default_values(cfg, loss_params: dict, step) -> dict:
  del step
  return {"logit_scale": logit_scale(cfg, loss_params)}


def engine_loss(cfg, mesh, inputs, local, values=default_values) -> registry.LossFn:
  """The loss_fn of an engine-based loss.

  Args:
    cfg: the resolved loss config.
    mesh: the device mesh (None: one shard).
    inputs: inputs(cfg, emb, batch) -> dict of batch-sharded arrays (shape-checked).
    local: local(cfg, s, r, shards) -> (loss, metrics) on the local shard `s` inside `shard_map`, with `r` the
      replicated values; metrics must be reduced over the shards already.
    values: values(cfg, loss_params, step) -> dict of replicated float32 scalars (default {"logit_scale": κ});
      they are logged with the metrics.
  """

  def loss_fn(emb, batch, loss_params, step):
    r = values(cfg, loss_params, step)
    loss, metrics = engine.shard(functools.partial(local, cfg), mesh, inputs(cfg, emb, batch), r)
    return loss, {**metrics, **r}

  return loss_fn


def register_engine_loss(name: str, default_config, validate, inputs, local, values=default_values,
                         init_params=init_scale, task_types=("retrieval",)) -> registry.LossSpec:
  """Registers an engine-based loss (`engine_loss`) with the logit-scale init and clamp."""

  def build(cfg, mesh, task=None):
    del task
    return engine_loss(cfg, mesh, inputs, local, values)

  return registry.register(registry.LossSpec(
      name=name, build=build, default_config=default_config, init_params=init_params, clamp_params=clamp_scale,
      validate=validate, task_types=task_types))
