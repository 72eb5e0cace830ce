"""What one compiled train step costs per device: memory (XLA's analysis), FLOPs, parameters; its summary and JSON.

Memory comes from `compiled.memory_analysis()`, which describes one device's share of the SPMD program: arguments
(the state shard, the batch shard, the teacher's params), outputs, the outputs aliased to donated arguments
(the new state reuses the old state's buffers) and temporaries. The predicted peak is
arguments + outputs - aliased + temporaries: donated buffers are counted once. FLOPs come from the step's jaxpr
(`flops.count_flops`: matmuls and convolutions, loop bodies times their trip counts, recomputation included);
XLA's own `cost_analysis()` figure, which counts a loop body once, is kept beside it for comparison. Parameter
bytes per device come from the state's shardings (each leaf's shard shape), so they fall as 1/fsdp for the
matrices the rules shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax

from big_embed import hardware
from big_embed.train import flops as flops_lib

REPORT_FILE = "compile_report.json"


@dataclasses.dataclass(frozen=True)
class StepCost:
  """One compiled train step (one task type and batch shape); byte and FLOP figures are per device."""

  task: str | None  # the text task type, None for image-text
  mesh: dict[str, int]
  device_kind: str
  batch: dict[str, list[int]]  # global batch shapes
  param_count: int
  param_bytes_per_device: int  # the model's and the loss's parameters
  state_bytes_per_device: int  # parameters + optimizer state + step + RNG
  argument_bytes: int | None  # XLA memory analysis (None where the backend gives none)
  output_bytes: int | None
  alias_bytes: int | None
  temp_bytes: int | None
  peak_bytes: int | None  # arguments + outputs - aliased + temporaries
  flops_per_device: float  # `flops.count_flops` of the step / the devices
  xla_flops_per_device: float | None  # XLA's cost analysis: loop bodies counted once
  uncounted_loops: int  # while loops of unknown trip count (their body counted once)
  compile_seconds: float  # trace + lower + XLA compile
  peak_tflops: float | None  # the device kind's peak (`hardware`), None when unknown

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def sharded_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of the arrays `abstract` (ShapeDtypeStructs) laid out as `shardings` (same tree)."""
  leaves = zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
  return sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize for x, sh in leaves)


def _memory(compiled) -> dict[str, int | None]:
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):  # a backend without the analysis
    m = None
  if m is None:
    return dict(argument_bytes=None, output_bytes=None, alias_bytes=None, temp_bytes=None, peak_bytes=None)
  args, out, alias, temp = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                            int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
  return dict(argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
              peak_bytes=args + out - alias + temp)


def _xla_flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def measure(traced, compiled, *, abstract_state, state_shardings, mesh, batch: dict, task: str | None,
            compile_seconds: float) -> StepCost:
  """The cost of the step `compiled` from `traced` (`jax.jit(...).trace(state, batch, ...)`).

  Args:
    traced, compiled: the step's `jax.stages.Traced` and the `Compiled` lowered from it.
    abstract_state, state_shardings: the train state (ShapeDtypeStructs) and its NamedShardings.
    mesh: the step's mesh; batch: the global batch (arrays or ShapeDtypeStructs); task: its text task type.
  """
  count = flops_lib.count_flops(traced.jaxpr)
  params = abstract_state.params
  kind = mesh.devices.flat[0].device_kind
  return StepCost(
      task=task, mesh={k: int(v) for k, v in mesh.shape.items()}, device_kind=kind,
      batch={k: list(v.shape) for k, v in sorted(batch.items())},
      param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
      param_bytes_per_device=sharded_bytes(params, state_shardings.params),
      state_bytes_per_device=sharded_bytes(abstract_state, state_shardings),
      **_memory(compiled), flops_per_device=count.flops / mesh.size, xla_flops_per_device=_xla_flops(compiled),
      uncounted_loops=count.uncounted_loops, compile_seconds=compile_seconds,
      peak_tflops=hardware.peak_tflops(kind))


def _size(n: float | None, unit: str = "B") -> str:
  if n is None:
    return "n/a"
  for prefix in ("", "K", "M", "G", "T", "P"):
    if abs(n) < 1000 or prefix == "P":
      return f"{n:.4g} {prefix}{unit}"
    n /= 1000
  raise AssertionError("unreachable")


def format_cost(cost: StepCost) -> str:
  """A few lines for the console: the step's memory, FLOPs and parameters per device."""
  mesh = " x ".join(f"{k}={v}" for k, v in cost.mesh.items())
  what = f"task type {cost.task!r}, " if cost.task else ""
  batch = ", ".join(f"{k} {v}" for k, v in cost.batch.items())
  peak = (f"peak {cost.peak_tflops:g} TFLOP/s per chip" if cost.peak_tflops else
          f"no peak TFLOP/s known for device kind {cost.device_kind!r}: MFU is not reported")
  loops = (f"; {cost.uncounted_loops} while loop(s) of unknown trip count counted once"
           if cost.uncounted_loops else "")
  lines = [
      f"Train step ({what}mesh {mesh}, {math.prod(cost.mesh.values())} x {cost.device_kind}), "
      f"compiled in {cost.compile_seconds:.1f} s; global batch: {batch}",
      f"  parameters: {cost.param_count:,} ({_size(cost.param_bytes_per_device)} per device); train state "
      f"{_size(cost.state_bytes_per_device)} per device",
      f"  XLA memory per device: arguments {_size(cost.argument_bytes)}, outputs {_size(cost.output_bytes)}, "
      f"aliased to donated arguments {_size(cost.alias_bytes)}, temporaries {_size(cost.temp_bytes)}; "
      f"predicted peak {_size(cost.peak_bytes)} (arguments + outputs - aliased + temporaries)",
      f"  FLOPs per step per device: {_size(cost.flops_per_device, 'FLOP')} (matmuls and convolutions as "
      f"executed, recomputation included{loops}; XLA's cost analysis, loop bodies once: "
      f"{_size(cost.xla_flops_per_device, 'FLOP')}); {peak}",
  ]
  return "\n".join(lines)


def write_report(workdir: pathlib.Path, costs: list[StepCost]) -> pathlib.Path:
  """`<workdir>/compile_report.json`: {"steps": [StepCost as JSON, ...]} (process 0 writes)."""
  path = pathlib.Path(workdir) / REPORT_FILE
  if jax.process_index() == 0:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"steps": [c.to_json() for c in costs]}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
  return path
