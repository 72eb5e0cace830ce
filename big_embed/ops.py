"""Numerical pieces shared by the models, the losses and the evaluators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`x / max(‖x‖, eps)` over the last axis, in float32 (torch's `F.normalize`, whose eps this is).

  Written as `x · rsqrt(max(Σx², eps²))`, so a zero row stays zero with a finite gradient (the `x / max(norm, eps)`
  form differentiates `sqrt` at 0 and gives NaN).
  """
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))
