"""Shared pieces of the engine-based losses: config fields and checks, the logit-scale parameter, inputs.

Config checks raise `ValueError` naming the field (`config.loss.<field>`) and the allowed range; they run in
`LossSpec.validate`, before anything compiles. Input checks (`array`, `pair_inputs`) run when the loss is
traced and name the `emb` / `batch` key.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from big_embed.losses import engine


def engine_fields(key_mode: str = "gather") -> dict:
  """Config fields of every engine-based loss."""
  return dict(
      tile_size=1024,     # key columns per tile: memory O(B_local × tile_size); results do not depend on it
      key_mode=key_mode,  # "gather" (all-gather keys) | "ring" (ppermute ring) | "local" (own shard only)
  )


def scale_fields(temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0) -> dict:
  """The CLIP-style learnable temperature: t = log(1/temperature), κ = exp(t), clamp t to [0, log max]."""
  return dict(temperature_init=temperature, learnable_temperature=learnable, max_logit_scale=max_logit_scale)


# ------------------------------------------------------------------------------------------------
# Checks.


def _name(field):
  return f"config.loss.{field}"


def check_positive(cfg, field: str):
  v = cfg[field]
  if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (v > 0 and math.isfinite(v)):
    raise ValueError(f"{_name(field)} must be a finite number > 0, got {v!r}")


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
    raise ValueError(f"{_name(field)} must be {what} in {lb}, {ub}, got {v!r}")


def check_choice(cfg, field: str, choices):
  if cfg[field] not in choices:
    raise ValueError(f"{_name(field)} must be one of {tuple(choices)}, got {cfg[field]!r}")


def check_bool(cfg, field: str):
  if not isinstance(cfg[field], (bool, np.bool_)):
    raise ValueError(f"{_name(field)} must be True or False, got {cfg[field]!r}")


def check_engine(cfg):
  check_range(cfg, "tile_size", lo=1, integer=True)
  check_choice(cfg, "key_mode", engine.KEY_MODES)


def check_scale(cfg):
  check_positive(cfg, "temperature_init")
  check_bool(cfg, "learnable_temperature")
  check_range(cfg, "max_logit_scale", lo=1.0)


def check_towers(cfg, field: str = "towers", n: int = 2):
  towers = tuple(cfg[field])
  if len(towers) != n or not all(isinstance(t, str) and t for t in towers) or len(set(towers)) != n:
    raise ValueError(f"{_name(field)} must be {n} distinct emb keys, got {towers!r}")


# ------------------------------------------------------------------------------------------------
# The logit scale.


def init_scale(cfg) -> dict:
  return {"logit_scale": jnp.asarray(np.log(1.0 / cfg.temperature_init), jnp.float32)}


def clamp_scale(cfg, params: dict) -> dict:
  if "logit_scale" not in params:
    return params
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, np.log(cfg.max_logit_scale))}


def logit_scale(cfg, params: dict) -> jax.Array:
  """κ = exp(t) in float32; t is stop-gradiented unless `learnable_temperature`."""
  t = jnp.asarray(params["logit_scale"], jnp.float32)
  if not cfg.learnable_temperature:
    t = jax.lax.stop_gradient(t)
  return jnp.exp(t)


def optional_scale(cfg, params: dict) -> jax.Array:
  """Losses with a fixed `temperature` unless `learnable_temperature` (then params["logit_scale"])."""
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


def pair_inputs(cfg, emb: dict, batch: dict, ids: bool = True) -> dict:
  """Two towers' embeddings [B, D] (float32) with optional batch["valid"] [B] and batch["ids"] [B]."""
  a_key, b_key = cfg.towers
  a = array(emb, a_key, "emb", ndim=2).astype(jnp.float32)
  b = array(emb, b_key, "emb", shape=a.shape).astype(jnp.float32)
  out = {"a": a, "b": b}
  valid = array(batch, "valid", "batch", shape=a.shape[:1], required=False)
  if valid is not None:
    out["valid"] = valid.astype(bool)
  if ids:
    i = array(batch, "ids", "batch", shape=a.shape[:1], required=False)
    if i is not None:
      out["ids"] = i.astype(jnp.int32)
  return out
