"""The matmul and convolution FLOPs of a traced program, counted on its jaxpr with loop trip counts.

XLA's `compiled.cost_analysis()["flops"]` counts the body of a `while` loop once, whatever its trip count (checked
on JAX 0.10: a `lax.scan` of k matmuls reports the FLOPs of one), and the similarity engine, gradient caching and
`scan_layers` all loop. `count_flops` walks the jaxpr instead: `dot_general` and `conv_general_dilated` FLOPs,
a `scan` body times its length, a `shard_map` body (per-device shapes) times the devices it runs on, the larger
branch of a `cond`, and every other sub-jaxpr (`pjit`, `remat`, `custom_jvp_call`, `custom_vjp_call`, ...) once.

The jaxpr of a train step holds its backward pass and every recomputation explicitly (a `jax.checkpoint` body is
replayed inside the backward; gradient caching embeds each chunk twice), so the count is the FLOPs the step
executes, recomputation included (hardware FLOPs), for the whole global batch. Elementwise work is not counted
(it is a few per cent of a Transformer's matmuls). A `while_loop` whose trip count is unknown at trace time is
counted once and reported in `FlopCount.uncounted_loops`.
"""

from __future__ import annotations

import dataclasses
import math

from jax.extend import core


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """A FLOP count, and how many loops in it could not be multiplied by their trip count."""

  flops: float  # matmul + convolution FLOPs of the whole program (every device together)
  uncounted_loops: int = 0  # while loops of unknown trip count, whose body was counted once

  def __add__(self, other: FlopCount) -> FlopCount:
    return FlopCount(self.flops + other.flops, self.uncounted_loops + other.uncounted_loops)

  def __mul__(self, times: float) -> FlopCount:
    return FlopCount(self.flops * times, self.uncounted_loops)


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> float:
  """2 × (batch × lhs free × rhs free × contracted) = 2 × |lhs| × |rhs free dims| (one multiply-add = 2 FLOPs)."""
  (_, rhs_contract), (_, rhs_batch) = dimension_numbers
  rhs_free = [d for i, d in enumerate(rhs_shape) if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * math.prod(lhs_shape) * math.prod(rhs_free)


def conv_flops(out_shape, rhs_shape, dimension_numbers) -> float:
  """2 × output elements × window size × the kernel's input features (per group already).

  The zeros of an input dilation (a strided convolution's input gradient) are counted as work; the one convolution
  of the models, the ViT patch embedding, takes no input gradient (its input is the images)."""
  rhs_spec = dimension_numbers.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
  window = math.prod(rhs_shape[d] for d in rhs_spec[2:])
  return 2.0 * math.prod(out_shape) * window * rhs_shape[rhs_spec[1]]


def _sub_jaxprs(value):
  if isinstance(value, (core.Jaxpr, core.ClosedJaxpr)):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _eqn_flops(eqn: core.JaxprEqn) -> FlopCount:
  name = eqn.primitive.name
  if name == "dot_general":
    return FlopCount(dot_general_flops(eqn.invars[0].aval.shape, eqn.invars[1].aval.shape,
                                       eqn.params["dimension_numbers"]))
  if name == "conv_general_dilated":
    return FlopCount(conv_flops(eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape, eqn.params["dimension_numbers"]))
  subs = [count_flops(j) for value in eqn.params.values() for j in _sub_jaxprs(value)]
  if not subs:
    return FlopCount(0.0)
  if name == "cond":
    return max(subs, key=lambda c: c.flops)
  total = sum(subs, FlopCount(0.0))
  if name == "scan":
    return total * eqn.params["length"]
  if name == "shard_map":
    mesh = eqn.params["mesh"]
    return total * math.prod(mesh.shape[a] for a in eqn.params["newly_manual_axes"])
  if name == "while":
    return FlopCount(total.flops, total.uncounted_loops + 1)
  return total


def count_flops(jaxpr: core.Jaxpr | core.ClosedJaxpr) -> FlopCount:
  """The matmul and convolution FLOPs of `jaxpr` (e.g. `jax.jit(f).trace(*args).jaxpr`), loops times their trip
  counts; see the module docstring for what is counted."""
  if isinstance(jaxpr, core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  return sum((_eqn_flops(eqn) for eqn in jaxpr.eqns), FlopCount(0.0))
