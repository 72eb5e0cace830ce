"""`--mode compile` and the throughput fields of the train records: per-device bytes that fall with FSDP (checked
against XLA's own memory analysis), the config-derived batch against the real stream's, the peak table and MFU,
window means of the logged metrics against a run that logs every step, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import hardware
from big_embed import metrics as metrics_lib
from big_embed.train import compile_only
from big_embed.train import experiment
from big_embed.train import loop
from big_embed.train import step_cost
from tests import event_files, tiny

THROUGHPUT = ("train/step_time_sec", "train/samples_per_sec", "train/device_tflops_per_sec")


def _batch_bytes_per_device(cost: step_cost.StepCost, devices: int) -> int:
  dtypes = {"image": np.uint8, "text": np.int32, "ids": np.int32, "score": np.float32}
  return sum(math.prod(shape) * np.dtype(dtypes[k]).itemsize for k, shape in cost.batch.items()) // devices


@pytest.fixture(scope="module")
def compiled(data_dir, tmp_path_factory):
  """mesh -> (StepCost, (parameter count, parameter bytes) of the whole model) of the tiny quickstart, data=8 and
  fsdp=8."""
  out = {}
  for name, mesh in (("data8", {"data": 8, "fsdp": 1}), ("fsdp8", {"data": 1, "fsdp": 8})):
    cfg = tiny.tiny_config(data_dir)
    cfg.mesh.update(mesh)
    workdir = tmp_path_factory.mktemp(name)
    (cost,) = compile_only.compile_train_step(cfg, str(workdir))
    assert json.loads((workdir / step_cost.REPORT_FILE).read_text())["steps"] == [cost.to_json()]
    exp = experiment.build_experiment(cfg, str(workdir))
    exp.checkpointer.close()
    leaves = jax.tree.leaves(exp.abstract_state.params)
    out[name] = cost, (sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves))
  return out


def test_fsdp_divides_the_parameter_bytes_per_device(compiled):
  (data8, (count, full)), (fsdp8, _) = compiled["data8"], compiled["fsdp8"]
  assert data8.param_count == fsdp8.param_count == count
  assert data8.param_bytes_per_device == full  # replicated
  # Every matrix with an "embed" axis is split 8 ways; biases and norms of other widths stay whole.
  assert full / 8 <= fsdp8.param_bytes_per_device <= 1.05 * full / 8
  assert fsdp8.argument_bytes < data8.argument_bytes / 7


def test_fsdp_keeps_the_activations_split_over_the_batch(data_dir, tmp_path):
  """With a batch large enough for activations to dominate (512), fsdp=8 must not hold more temporaries than data=8:
  the towers constrain their activations to the batch axes (`sharding.constrain_batch`). Measured: temporaries
  2.62 MB with fsdp=8 vs 3.32 MB with data=8; without the constraint fsdp=8 held 6.43 MB (the activations followed
  the weights' "embed" sharding, the batch whole on every device)."""
  temps = {}
  for name, mesh in (("data8", {"data": 8, "fsdp": 1}), ("fsdp8", {"data": 1, "fsdp": 8})):
    cfg = tiny.tiny_config(data_dir)
    cfg.mesh.update(mesh)
    cfg.train.batch_size = 512
    (cost,) = compile_only.compile_train_step(cfg, str(tmp_path / name))
    temps[name] = cost.temp_bytes
  assert temps["fsdp8"] <= temps["data8"], temps


@pytest.mark.parametrize("mesh", ["data8", "fsdp8"])
def test_xla_memory_matches_the_state_shardings(compiled, mesh):
  """XLA's arguments are the state shard plus the batch shard; the whole state is donated (aliased)."""
  cost, _ = compiled[mesh]
  assert cost.argument_bytes == cost.state_bytes_per_device + _batch_bytes_per_device(cost, 8)
  assert cost.alias_bytes == cost.state_bytes_per_device
  assert cost.peak_bytes >= cost.argument_bytes and cost.temp_bytes > 0
  assert cost.flops_per_device > 0 and cost.uncounted_loops == 0 and cost.compile_seconds > 0
  assert cost.peak_tflops is None and cost.device_kind == "cpu"


def test_the_printed_summary_names_every_figure(compiled):
  text = step_cost.format_cost(compiled["fsdp8"][0])
  for part in ("mesh data=1 x fsdp=8 x tensor=1", "parameters: ", "per device", "arguments", "temporaries",
               "predicted peak", "FLOPs per step per device", "MFU is not reported"):
    assert part in text, (part, text)


@pytest.mark.parametrize("mismatched", [0.0, 0.25])
def test_the_config_batch_is_the_streams_batch(data_dir, tmp_path, mismatched):
  cfg = tiny.tiny_config(data_dir)
  cfg.data.mismatched_fraction = mismatched
  exp = experiment.build_experiment(cfg, str(tmp_path))
  exp.checkpointer.close()
  real = next(iter(experiment.make_train_stream(exp, seed=0)))
  want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in real.items()}
  got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in compile_only.image_text_batch(exp.config).items()}
  assert got == want


@pytest.mark.slow
def test_text_tasks_compile_every_batch_the_stream_yields(text_data_dir, tmp_path):
  """One executable per distinct (task type, batch shapes); the stream's first steps need no other."""
  cfg = tiny.recipe("piccolo2_hybrid", "tiny")
  cfg.data.data_dir = str(text_data_dir)
  cfg.data.tasks = {k: cfg.data.tasks[k] for k in ("bible", "foldoc", "fortunes")}  # two retrieval: one compile
  costs = compile_only.compile_train_step(cfg, str(tmp_path))
  compiled = {(c.task, tuple(sorted((k, tuple(v)) for k, v in c.batch.items()))) for c in costs}
  assert len(compiled) == len(costs) == 2
  assert {c.task for c in costs} == {t.type for t in cfg.data.tasks.values()}
  exp = experiment.build_experiment(cfg, str(tmp_path))
  exp.checkpointer.close()
  stream = iter(experiment.make_train_stream(exp, seed=cfg.seed))
  for _ in range(40):
    task, batch = next(stream)
    assert (task, tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))) in compiled, task


# ------------------------------------------------------------------------------------------------
# The peak table and the train window.


def test_peak_table_and_mfu():
  assert hardware.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert hardware.peak_tflops("TPU v5 lite") == 197.0
  assert hardware.mfu(494.5, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
  assert hardware.peak_tflops("cpu") is None and hardware.mfu(1.0, "cpu") is None
  assert hardware.peak_tflops("TPU v4 lite") is None  # not v4: no prefix matching
  assert all(math.isfinite(v) and v > 0 for v in hardware.PEAK_TFLOPS.values())


@pytest.mark.parametrize("kind", ["NVIDIA H100 80GB HBM3", "cpu"])
def test_the_window_averages_and_gives_mfu_when_the_peak_is_known(kind):
  window = metrics_lib.TrainWindow(kind)
  losses = [0.5, 2.0, 3.5]
  for i, loss in enumerate(losses):
    window.add(i + 1, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(i), "learning_rate": jnp.float32(i / 10)},
               samples=4, flops_per_device=3e12)
  with window.paused():  # an evaluation, a checkpoint: not step time
    time.sleep(0.3)
  rec = window.record(window.fetch())
  assert 3 * rec["train/step_time_sec"] < 0.3
  assert rec["train/loss"] == pytest.approx(np.mean(losses)) and rec["train/grad_norm"] == pytest.approx(1.0)
  assert rec["train/learning_rate"] == pytest.approx(0.2)  # the last step's
  seconds = 3 * rec["train/step_time_sec"]
  assert rec["train/samples_per_sec"] * seconds == pytest.approx(12)
  assert rec["train/device_tflops_per_sec"] * seconds == pytest.approx(9)
  if kind == "cpu":
    assert "train/mfu" not in rec
  else:
    assert rec["train/mfu"] == pytest.approx(rec["train/device_tflops_per_sec"] / 989.0)


# ------------------------------------------------------------------------------------------------
# A real run: its records against a run of the same seed that logs every step.


def _tensorboard_scalars(directory) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from the event files of `directory`."""
  out: dict[str, dict[int, float]] = {}
  for path in directory.glob("events.out.tfevents.*"):
    for step, tag, value in event_files.scalars(path):
      out.setdefault(tag, {})[step] = value
  return out


def _run(data_dir, workdir, log_every):
  cfg = tiny.tiny_config(data_dir, steps=6)
  cfg.train.update(dict(log_every=log_every, checkpoint_every=6))
  cfg.evals = {}
  loop.train_and_evaluate(cfg, str(workdir))
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "train/loss" in r}


def test_records_hold_window_means_and_throughput(data_dir, tmp_path, capfd):
  every = _run(data_dir, tmp_path / "every", 1)
  out = capfd.readouterr().out
  assert out.count("Train step (") == 1, out  # compiled once, from the config's batch, before the first step
  windowed = _run(data_dir, tmp_path / "windowed", 3)
  assert sorted(every) == [1, 2, 3, 4, 5, 6] and sorted(windowed) == [3, 6]
  for end in (3, 6):
    steps = range(end - 2, end + 1)
    for name in ("train/loss", "train/grad_norm", "train/accuracy"):
      want = np.mean([every[s][name] for s in steps])
      assert windowed[end][name] == pytest.approx(want, rel=1e-6), (name, end)
    assert windowed[end]["train/learning_rate"] == every[end]["train/learning_rate"]

  (cost,) = json.loads((tmp_path / "windowed" / step_cost.REPORT_FILE).read_text())["steps"]
  tb = _tensorboard_scalars(tmp_path / "windowed" / "tensorboard")
  for step, rec in windowed.items():
    assert all(math.isfinite(rec[k]) and rec[k] > 0 for k in THROUGHPUT), rec
    assert "train/mfu" not in rec  # CPU: no known peak
    assert rec["train/samples_per_sec"] * rec["train/step_time_sec"] == pytest.approx(16)  # the batch size
    achieved = rec["train/device_tflops_per_sec"] * 1e12 * rec["train/step_time_sec"]
    assert achieved == pytest.approx(cost["flops_per_device"], rel=1e-5)
    for k in (*THROUGHPUT, "train/loss"):
      assert tb[k][step] == pytest.approx(rec[k], rel=1e-6), k


@pytest.mark.slow
def test_mode_compile_on_the_command_line(data_dir, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "big_embed.main", "--mode", "compile", "--cpu_devices", "8",
       "--config", str(tiny.ROOT / "configs" / "quickstart.py") + ":tiny", "--workdir", str(tmp_path),
       f"--config.data.data_dir={data_dir}", "--config.mesh.fsdp=8", "--config.mesh.data=1"],
      capture_output=True, text=True, cwd=tiny.ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "mesh data=1 x fsdp=8 x tensor=1, 8 x cpu" in proc.stdout, proc.stdout
  (cost,) = json.loads((tmp_path / step_cost.REPORT_FILE).read_text())["steps"]
  assert cost["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and cost["param_bytes_per_device"] > 0
  assert not list(tmp_path.glob("checkpoints/*/"))  # nothing was trained
