"""Metric writers (one JSON line per record in `<workdir>/metrics.jsonl`, TensorBoard event files) and the train
window (the steps between two train records: their mean metrics, step time, throughput and MFU).

A metric has one name everywhere: the key of its metrics.jsonl record is its TensorBoard tag, verbatim
("eval/debtags/p@1", "eval/bible/recall@1@d64"). tensorboardX's `add_scalar` would turn every character other than
letters, digits and "_-/." into "_" ("p_1"), so the writer builds the summaries itself; TensorBoard reads any tag.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from typing import Any

import jax
from tensorboardX import FileWriter
from tensorboardX.proto.summary_pb2 import Summary

from big_embed import hardware


class MetricWriter:
  """Writes scalars from process 0 only; `write(step, {"train/loss": 0.3, ...})`."""

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")
      self._tb = FileWriter(str(self.workdir / "tensorboard"), flush_secs=10)

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in clean.items()])
    self._tb.add_summary(summary, int(step), record["time"])

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def flatten(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
  return {f"{prefix}/{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}


class TrainWindow:
  """The steps since the last train record.

  `add` keeps each step's metrics on the device (scalars; each copied to the host once, when first fetched), its
  global rows and its FLOPs per device; time spent inside `paused()` (evaluation, checkpoints, compilation) is not
  step time. `fetch` waits for the window's steps and returns their metrics;
  `record` turns them into the logged scalars: every train metric is the mean over the window's steps that were not
  skipped (the step's `skipped` metric, train/step.py: a skipped step's loss may be NaN or inf and says nothing of the
  model; over all its steps when every step was skipped); the learning rate is the last step's (a schedule, not a
  measurement); `skipped_steps` counts the skipped steps; plus `step_time_sec` (seconds per step),
  `samples_per_sec`, `device_tflops_per_sec` (step FLOPs per device / step time) and `mfu` (that / the chip's peak,
  `hardware`; absent when the device kind's peak is unknown, e.g. on CPU).
  """

  def __init__(self, device_kind: str):
    self.device_kind = device_kind
    self.reset()

  def reset(self):
    self._steps: list[tuple[int, Any]] = []  # (step, metrics dict of device scalars)
    self._host: list[tuple[int, dict[str, float]]] = []  # the first len(_host) steps, copied to the host
    self._samples = 0
    self._flops = 0.0
    self._start = time.perf_counter()
    self._paused = 0.0

  def add(self, step: int, metrics: Any, samples: int, flops_per_device: float):
    self._steps.append((step, metrics))
    self._samples += samples
    self._flops += flops_per_device

  @contextlib.contextmanager
  def paused(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - start

  def fetch(self, newest: bool = True) -> list[tuple[int, dict[str, float]]]:
    """(step, {name: float}) of every step of the window, in order (waits for them to finish); `newest=False`
    leaves out the newest step, whose program may still be running: waiting for the ones before it does not leave
    the device idle."""
    end = len(self._steps) if newest else max(len(self._steps) - 1, len(self._host))
    new = jax.device_get(self._steps[len(self._host):end])
    self._host += [(step, {k: float(v) for k, v in m.items()}) for step, m in new]
    return list(self._host)

  def record(self, fetched: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """The window's scalars ("train/<name>"), timed now: call right after `fetch`, then `reset`."""
    seconds = max(time.perf_counter() - self._start - self._paused, 1e-9)
    names = dict.fromkeys(k for _, m in fetched for k in m if k != "skipped")  # text tasks: each loss's metrics
    every = [m for _, m in fetched]
    applied = [m for m in every if not m.get("skipped")]
    out = {"train/skipped_steps": float(len(every) - len(applied))}
    for name in names:
      if name == "learning_rate":
        out[f"train/{name}"] = [m[name] for m in every if name in m][-1]
        continue
      values = [m[name] for m in applied if name in m] or [m[name] for m in every if name in m]
      out[f"train/{name}"] = math.fsum(values) / len(values)
    tflops = self._flops / seconds / 1e12
    out.update({"train/step_time_sec": seconds / len(fetched), "train/samples_per_sec": self._samples / seconds,
                "train/device_tflops_per_sec": tflops})
    mfu = hardware.mfu(tflops, self.device_kind)
    if mfu is not None:
      out["train/mfu"] = mfu
    return out
