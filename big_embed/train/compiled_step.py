"""The train step compiled ahead of time: one executable per (text task type, batch shapes), each with its cost.

`TrainStep.executable(batch, task)` traces, lowers and compiles the step for the batch's shapes (arrays or
`jax.ShapeDtypeStruct`s: `--mode compile` needs no data) once, measures it (`step_cost.measure`) and keeps it;
training calls that same executable, so nothing compiles twice and the cost printed before training is the cost
of the program that runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import time
from typing import Any, Callable

import jax

from big_embed.train import step_cost


@dataclasses.dataclass(frozen=True)
class Executable:
  """A compiled step: `(state, batch, teacher_params) -> (state, metrics)`, the state donated."""

  compiled: Any  # jax.stages.Compiled
  cost: step_cost.StepCost

  def __call__(self, state, batch, teacher_params=None):
    return self.compiled(state, batch, teacher_params)


def release_freed_heap() -> None:
  """Returns the heap that compilation freed to the operating system (glibc's `malloc_trim`; elsewhere nothing).

  XLA's compiler allocates and frees 0.3-0.5 GiB while it compiles the W1 step; glibc keeps that freed memory in
  its arenas, and the step's own buffers are fresh allocations beside it, so it adds to the resident peak of
  every later step (0.2 GiB of the W1 step's 2.6 GiB, benchmarks/RESULTS.md) unless it is handed back.
  """
  name = ctypes.util.find_library("c")
  libc = ctypes.CDLL(name) if name else None
  if libc is not None and hasattr(libc, "malloc_trim"):
    libc.malloc_trim(0)


def _signature(batch: dict) -> tuple:
  return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


class TrainStep:
  """Compiles `step_fn(task)` (a pure `(state, batch, teacher_params) -> (state, metrics)`) per task type and
  batch shapes with fixed shardings; `on_compile(cost)` is called once per new executable."""

  def __init__(self, step_fn: Callable[[str | None], Callable], *, mesh, abstract_state, state_shardings,
               in_shardings: tuple, out_shardings: tuple, abstract_teacher_params=None,
               on_compile: Callable[[step_cost.StepCost], None] | None = None):
    self._step_fn = step_fn
    self._mesh = mesh
    self._abstract_state = abstract_state
    self._state_shardings = state_shardings
    self._in_shardings = in_shardings
    self._out_shardings = out_shardings
    self._abstract_teacher_params = abstract_teacher_params
    self._on_compile = on_compile
    self._executables: dict[tuple, Executable] = {}

  @property
  def costs(self) -> list[step_cost.StepCost]:
    """The cost of every executable compiled so far, in compilation order."""
    return [e.cost for e in self._executables.values()]

  def executable(self, batch: dict, task: str | None = None) -> Executable:
    """The step for `batch`'s shapes and dtypes (global arrays or ShapeDtypeStructs) and text task type `task`."""
    key = (task, _signature(batch))
    if key not in self._executables:
      start = time.perf_counter()
      jitted = jax.jit(self._step_fn(task), in_shardings=self._in_shardings, out_shardings=self._out_shardings,
                       donate_argnums=(0,))
      abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
      with jax.set_mesh(self._mesh):  # activations constrained to the batch axes (`sharding.constrain_batch`)
        traced = jitted.trace(self._abstract_state, abstract_batch, self._abstract_teacher_params)
      compiled = traced.lower().compile()
      cost = step_cost.measure(traced, compiled, abstract_state=self._abstract_state,
                               state_shardings=self._state_shardings, mesh=self._mesh, batch=abstract_batch,
                               task=task, compile_seconds=time.perf_counter() - start)
      self._executables[key] = Executable(compiled, cost)
      release_freed_heap()
      if self._on_compile is not None:
        self._on_compile(cost)
    return self._executables[key]

  def __call__(self, state, batch: dict, teacher_params=None, task: str | None = None):
    return self.executable(batch, task)(state, batch, teacher_params)
