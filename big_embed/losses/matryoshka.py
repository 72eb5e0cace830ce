"""Matryoshka wrapper: any registered loss over nested embedding prefixes (Kusupati et al., NeurIPS 2022).

Matryoshka Representation Learning (arXiv 2205.13147) trains every prefix `z[:m]`, `m ∈ M`, of the embedding
to be usable on its own. For embedding losses each prefix is re-normalised (`x[..., :m] / ‖x[..., :m]‖`,
computed in float32 with an ε) and the wrapped ("inner") loss is applied to it:

    L = (1/|M|) Σ_{m∈M} L_inner(prefix_m)     reduction="mean"  (Piccolo2, arXiv 2405.06932 §3.4)
    L =         Σ_{m∈M} L_inner(prefix_m)     reduction="sum"   (the MRL paper, c_m = 1)

The two differ by a factor |M| in the effective learning rate.

Config fields (`config_utils.loss("matryoshka", inner=config_utils.loss("clip"), dims=(64, 128))`):
  inner: the wrapped loss's sub-config (a ConfigDict with its own `name`).
  dims: increasing prefix sizes, each <= the embedding dim D (checked when the loss is called).
  reduction: "mean" | "sum".
  towers: emb keys to truncate; empty means every entry of `emb`. Other emb entries and `batch` are passed
    to the inner loss unchanged.

The inner loss's learnable params (`init_params`, `clamp_params`) are shared by all prefixes. The inner loss
is traced once per prefix, so sharding is whatever the inner loss does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from big_embed.errors import ConfigError
from big_embed.losses import registry
from big_embed.ops import l2_normalize

REDUCTIONS = ("mean", "sum")


def prefix(x: jax.Array, m: int) -> jax.Array:
  """The first m features of x [..., D], re-normalised -> [..., m] float32."""
  return l2_normalize(x[..., :m])


def check_dims(dims: Sequence[int], arrays: dict[str, jax.Array], where: str = "config.loss.dims") -> None:
  """Raises ValueError unless every prefix size is <= the last dim of every array (all of the same D)."""
  sizes = {k: v.shape[-1] for k, v in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"matryoshka: the truncated embeddings have different dims {sizes}; "
                     "set config.loss.towers to the embedding keys only")
  if sizes:
    d = next(iter(sizes.values()))
    if max(dims) > d:
      raise ValueError(f"matryoshka: {where}={tuple(dims)} must all be <= the embedding dim D={d} of {sorted(sizes)}")


def nested(loss_of: Callable[[int], tuple[jax.Array, dict]], dims: Sequence[int],
           reduction: str = "mean") -> tuple[jax.Array, dict]:
  """Reduces `loss_of(m)` over the prefix sizes; metrics of prefix m are prefixed with `d{m}/`."""
  losses, metrics = [], {}
  for m in dims:
    loss, met = loss_of(m)
    losses.append(loss)
    metrics.update({f"d{m}/{k}": v for k, v in met.items()})
  total = sum(losses[1:], losses[0])
  if reduction == "mean":
    total = total / len(losses)
  return total, metrics


def validate_dims(dims, reduction, field: str = "dims", reduction_field: str = "reduction") -> None:
  dims = tuple(dims)
  if not dims or any(not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m <= 0 for m in dims):
    raise ConfigError(f"{registry.field_path(field)} must be a non-empty list of positive ints, got {dims}")
  if any(a >= b for a, b in zip(dims, dims[1:])):
    raise ConfigError(f"{registry.field_path(field)} must be strictly increasing, got {dims}")
  if reduction not in REDUCTIONS:
    raise ConfigError(f"{registry.field_path(reduction_field)} must be one of {REDUCTIONS}, got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------
# Registered loss.


def _default_config():
  return dict(
      inner={"name": "clip"},  # resolved with the clip loss's defaults
      dims=(64, 128, 256),
      reduction="mean",
      towers=(),  # emb keys to truncate; () = all
  )


def _validate(cfg):
  validate_dims(cfg.dims, cfg.reduction)


def _build(cfg, mesh, task=None):
  inner_fn = registry.build_inner(cfg, mesh, task)
  dims = tuple(int(m) for m in cfg.dims)
  reduction = cfg.reduction

  def loss_fn(emb, batch, loss_params, step):
    keys = tuple(cfg.towers) or tuple(emb)
    missing = [k for k in keys if k not in emb]
    if missing:
      raise ValueError(f"matryoshka: config.loss.towers {missing} are not in emb (keys: {sorted(emb)})")
    check_dims(dims, {k: emb[k] for k in keys})

    def loss_of(m):
      return inner_fn({**emb, **{k: prefix(emb[k], m) for k in keys}}, batch, loss_params, step)

    loss, metrics = nested(loss_of, dims, reduction)
    return loss, {"loss": loss, **metrics}

  return loss_fn


SPEC = registry.wrapper("matryoshka", _build, _default_config, _validate)
