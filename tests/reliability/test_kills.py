"""Ten SIGKILLs at random moments of one short run, half of them while a checkpoint is being written.

After each kill the same command is rerun; every checkpoint a rerun writes is compared with the checkpoint of the
same step of an uninterrupted run (the fingerprints of all arrays: params, optimizer state, step, RNG), and the
final state array by array. No kill may leave a checkpoint that a rerun finds damaged.
"""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from big_embed import checkpoint as ckpt_lib
from big_embed.train import experiment
from tests import tiny

STEPS = 40
FLAGS = (f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2", f"--config.train.eval_every={STEPS}",
         "--config.train.keep_checkpoints=100", "--config.train.log_every=2")
KILLS = 10


def _command(workdir, data_dir):
  return [sys.executable, "-m", "big_embed.main", "--config", str(tiny.ROOT / "configs/quickstart.py:tiny"),
          "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", *FLAGS]


def _steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _writing(workdir, since: float) -> bool:
  """Whether a checkpoint is being written: Orbax's temporary step directory, created after `since` (a killed
  run's stays behind until a rerun writes that step again)."""
  d = pathlib.Path(workdir) / "checkpoints"
  try:
    return d.exists() and any("tmp" in p.name and p.stat().st_mtime >= since for p in d.iterdir())
  except FileNotFoundError:  # renamed while looking
    return False


def _fingerprints(workdir, step) -> dict:
  return json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())[
      "fingerprints"]


def _final_state(workdir, data_dir):
  cfg = tiny.tiny_config(data_dir, steps=STEPS)
  exp = experiment.build_experiment(cfg, str(workdir))
  abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  state, _ = exp.checkpointer.restore(STEPS, abstract)
  exp.checkpointer.close()
  return jax.device_get(state)


def _kill_when(proc, workdir, ready, timeout_s=300) -> bool:
  """SIGKILLs `proc` as soon as `ready()`; False if the run ended first."""
  deadline = time.time() + timeout_s
  while time.time() < deadline and proc.poll() is None:
    if ready():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.002)
  return False


def test_ten_random_sigkills_each_resume_bitwise_equal(tmp_path, data_dir):
  reference = tmp_path / "uninterrupted"
  done = subprocess.run(_command(reference, data_dir), capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  want = {step: _fingerprints(reference, step) for step in _steps(reference)}
  assert sorted(want) == list(range(2, STEPS + 1, 2))

  workdir, rng, report = tmp_path / "killed", random.Random(12), []
  for k in range(KILLS):
    before = set(_steps(workdir))
    started = time.time()
    proc = subprocess.Popen(_command(workdir, data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    if k % 2 == 0:  # while its second new checkpoint is being written (Orbax's temporary step directory exists)
      moment = "during a checkpoint write"
      ready = lambda before=before, t=started: bool(set(_steps(workdir)) - before) and _writing(workdir, t)
    else:  # a random moment after this run's first new checkpoint
      delay, since = rng.uniform(0.0, 0.5), []

      def ready(delay=delay, since=since, before=before):
        if not since and set(_steps(workdir)) - before:
          since.append(time.time())
        return bool(since) and time.time() - since[0] >= delay

      moment = f"{delay:.2f} s after a new checkpoint"
    killed = _kill_when(proc, workdir, ready)
    err = proc.stderr.read()
    assert killed, f"kill {k + 1}: the run ended before the kill ({moment}); checkpoints {_steps(workdir)}"
    assert "warning: the checkpoint" not in err and "Traceback" not in err, err[-3000:]
    report.append((k + 1, moment, sorted(before), _steps(workdir)))

  final = subprocess.run(_command(workdir, data_dir), capture_output=True, text=True, timeout=600, check=False)
  assert final.returncode == 0, final.stderr[-3000:]
  assert "warning: the checkpoint" not in final.stderr

  # Each rerun's checkpoints (and the final run's) equal the uninterrupted run's at the same step.
  equal = 0
  for k, (_, moment, _, after_kill) in enumerate(report):
    written = sorted(set(report[k + 1][3] if k + 1 < len(report) else _steps(workdir)) - set(after_kill))
    assert written, f"the rerun after kill {k + 1} ({moment}) wrote no checkpoint"
    for step in written:
      assert _fingerprints(workdir, step) == want[step], f"rerun after kill {k + 1} ({moment}), step {step}"
    equal += 1
  print(f"\n{equal}/{KILLS} reruns after a SIGKILL wrote checkpoints bitwise equal to the uninterrupted run's; "
        f"kills: {[(k, m, after[-1] if after else None) for k, m, _, after in report]}")
  assert equal == KILLS

  got, ref = _final_state(workdir, data_dir), _final_state(reference, data_dir)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
