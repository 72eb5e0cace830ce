"""Metric writers: one JSON line per record in `<workdir>/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars from process 0 only; `write(step, {"train/loss": 0.3, ...})`."""

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self.workdir = pathlib.Path(workdir)
    self._tb = None
    if self.enabled:
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=10)

  def write(self, step: int, scalars: dict[str, float]):
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(),
              **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def flatten(results: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
  return {f"{prefix}/{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}
