"""End-to-end runs of `python -m big_embed.main` in subprocesses: train, eval, SIGTERM stop, bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from big_embed import run as run_lib
from big_embed.parallel import mesh as mesh_lib
from tests import tiny

pytestmark = pytest.mark.slow


def _command(workdir, data_dir, *overrides, mode="train"):
  return [sys.executable, "-m", "big_embed.main", "--config", str(tiny.ROOT / "configs/quickstart.py:tiny"),
          "--workdir", str(workdir), f"--mode={mode}", f"--config.data.data_dir={data_dir}", *overrides]


def _run(*args, **kwargs):
  return subprocess.run(_command(*args, **kwargs), capture_output=True, text=True, timeout=600, cwd=tiny.ROOT,
                        check=False)


def _checkpoint_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


STEPS = ("--config.train.steps=60", "--config.train.checkpoint_every=10", "--config.train.eval_every=60")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = _run(workdir, data_dir, *STEPS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_run_writes_results_checkpoint_and_logs(uninterrupted, data_dir):
  workdir, proc = uninterrupted
  results = json.loads((workdir / "eval_results.json").read_text())
  assert results["step"] == 60
  assert set(results["fashion_mnist"]) == {"top1", "top5"}
  assert {"i2t_r1", "t2i_r10", "chance_r10"} <= set(results["emoji"])
  assert "Results at step 60" in proc.stdout and "fashion_mnist" in proc.stdout
  assert _checkpoint_steps(workdir) == [50, 60]  # keep_checkpoints=2
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in r for r in records) and any("eval/fashion_mnist/top1" in r for r in records)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

  # --mode eval on the checkpoint reproduces the final numbers.
  (workdir / "eval_results.json").unlink()
  proc = _run(workdir, data_dir, *STEPS, mode="eval")
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads((workdir / "eval_results.json").read_text())
  for name in ("fashion_mnist", "emoji"):
    for k, v in results[name].items():
      assert again[name][k] == pytest.approx(v, abs=1e-6), (name, k)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_saves_a_checkpoint_and_exits_cleanly(signum, tmp_path, data_dir):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(_command(workdir, data_dir, "--config.train.steps=100000",
                                   "--config.train.checkpoint_every=1000"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tiny.ROOT)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # wait until training is under way
    if (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().count("\n") >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"Stopped by {signal.Signals(signum).name}" in out and "Traceback" not in err
  steps = _checkpoint_steps(workdir)
  assert len(steps) == 1 and 4 <= steps[0] < 1000, steps



def test_a_second_sigint_aborts_at_once(tmp_path, data_dir):
  workdir = tmp_path / "int"
  proc = subprocess.Popen(_command(workdir, data_dir, "--config.train.steps=100000",
                                   "--config.train.checkpoint_every=1000"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tiny.ROOT)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text().count("\n") >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.1)  # two signals before the handler runs would arrive as one
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
  assert "Aborted by a second SIGINT" in err and "Traceback" not in err, err[-3000:]
  assert "Stopped by" not in out


BAD_INPUTS = [
    ("unknown field", ["--config.train.batch_sise=32"], "batch_size"),
    ("wrong type", ["--config.train.batch_size=many"], "batch_size"),
    ("indivisible batch", ["--config.train.batch_size=12"], "divisible"),
    ("unknown loss", ["--config.loss.name=no_such_loss"], "config.loss.name"),
    ("bad temperature", ["--config.loss.temperature=0"], "config.loss.temperature"),
    ("bad dtype", ["--config.model.dtype=bf16"], "did you mean 'bfloat16'"),
    ("bad mesh", ["--config.mesh.data=3"], "config.mesh"),
    ("bad eval setting", ["--config.evals.fashion_mnist.split=nope"], "nope"),
]


@pytest.mark.parametrize("name,overrides,expected", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_actionable_line(tmp_path, data_dir, name, overrides, expected):
  del name
  proc = _run(tmp_path / "wd", data_dir, *overrides)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], proc.stderr


def test_any_loss_field_can_be_overridden(tmp_path, data_dir):
  """The recipe sets only some of the loss's fields; an override of another one reaches the run's saved config."""
  assert "tile_size" not in tiny.recipe("quickstart", "tiny").loss
  proc = _run(tmp_path / "wd", data_dir, "--config.train.steps=2", "--config.loss.tile_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = run_lib.restore_run(tmp_path / "wd", mesh_lib.make_mesh({"data": -1})).config
  assert saved.loss.tile_size == 4 and saved.loss.temperature == 0.07  # the override, and a recipe field


def test_missing_dataset_and_unwritable_workdir(tmp_path):
  empty = tmp_path / "no_data"
  empty.mkdir()
  proc = _run(tmp_path / "wd", empty)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(lines) == 1 and "python -m big_embed.data.prepare" in lines[0], proc.stderr

  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = _run(blocker / "wd", empty)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert len(lines) == 1 and "not writable" in lines[0], proc.stderr


def _step_in_processes(tmp_path, data_dir, name, processes, devices) -> dict:
  """tests/multihost_step.py in `processes` processes with `devices` CPU devices each; process 0's results."""
  port = portpicker.pick_unused_port()
  env = {**os.environ, "XLA_FLAGS": ""}
  out = tmp_path / f"{name}.npz"
  flags = ["--data_dir", str(data_dir), "--workdir", str(tmp_path / name), "--out", str(out),
           "--cpu_devices", str(devices)]
  if processes > 1:
    flags += ["--coordinator_address", f"127.0.0.1:{port}", "--num_processes", str(processes)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_step", *flags,
                             *(["--process_id", str(i)] if processes > 1 else [])],
                            cwd=tiny.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  return dict(np.load(out))


def test_two_processes_compute_the_one_process_step(tmp_path, data_dir):
  """2 processes x 4 devices (jax.distributed) and 1 process x 8 devices take the same global batches: the
  per-step loss and gradient norm and the final parameters agree."""
  one = _step_in_processes(tmp_path, data_dir, "one", 1, 8)
  two = _step_in_processes(tmp_path, data_dir, "two", 2, 4)
  assert set(one) == set(two) and any(k.startswith("metrics/") for k in one)
  assert np.abs(one["metrics/loss"] - one["metrics/loss"][0]).max() > 1e-4  # the steps really train
  for name in sorted(one):
    # The loss and gradient norm of every step agree closely; parameters to about one learning rate per step
    # (Adam turns float32 noise in a zero true gradient, e.g. of an attention key bias, into steps of ±lr).
    atol = 1e-6 if name.startswith("metrics/") else 3 * tiny.tiny_config().train.learning_rate
    np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=atol, err_msg=name)


def test_two_processes_train_together_and_resume_on_one(tmp_path, data_dir):
  """launch/simulate_multihost.sh: 2 processes x 4 CPU devices joined by jax.distributed, then a 1-process resume."""
  workdir = tmp_path / "multihost"
  env = {**os.environ, "NPROC": "2", "DEVICES": "4", "TIMEOUT_S": "300",
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                             if not f.startswith("--xla_force_host_platform_device_count"))
  proc = subprocess.run(
      ["bash", "launch/simulate_multihost.sh", "configs/quickstart.py:tiny", str(workdir),
       f"--config.data.data_dir={data_dir}", "--config.train.steps=4"],
      capture_output=True, text=True, timeout=600, cwd=tiny.ROOT, env=env, check=False)
  logs = "\n".join(p.read_text()[-2000:] for p in workdir.glob("process_*.log"))
  assert proc.returncode == 0, proc.stderr + logs
  assert _checkpoint_steps(workdir) == [2, 4]
  assert json.loads((workdir / "eval_results.json").read_text())["step"] == 4
  # The 2x4-device checkpoint resumes in one process on 8 devices.
  resumed = _run(workdir, data_dir, "--config.train.steps=6")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from the checkpoint at step 4" in resumed.stdout
  assert _checkpoint_steps(workdir) == [4, 6]
