"""A full file system: the run stops with one line naming the failed and the intact step; nothing intact changes.

The workdir lives on a small tmpfs mounted in a private mount namespace (`unshare --mount --map-root-user`, so no
privileges are needed where user namespaces are enabled, and nothing outlives the test). A first run writes the
checkpoint of step 2; the file system is then filled until too little is left for a checkpoint (or for
anything), and the rerun must stop with one `error:` line, exit 1, no traceback, and leave step 2 byte-identical.
"""

import errno
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from big_embed import errors
from big_embed import metrics
from big_embed.train import loop
from tests import tiny

SCRIPT = r"""
set -u
mount -t tmpfs -o size=8m tmpfs "$MNT" || exit 77
run() { "$PY" -m big_embed.main --config "$RECIPE" --workdir "$MNT/run" --config.data.data_dir="$DATA" \
  --config.train.checkpoint_every=2 --config.train.log_every=2 --config.train.keep_checkpoints=5 "$@"; }
run --config.train.steps=2 --config.train.eval_every=100 > "$OUT/first.out" 2> "$OUT/first.err" || exit 3
(cd "$MNT/run/checkpoints" && find 2 -type f -print0 | sort -z | xargs -0 sha256sum) > "$OUT/before.sha"
free_kb=$(df -k --output=avail "$MNT" | tail -1)
dd if=/dev/zero of="$MNT/filler" bs=1k count=$((free_kb - LEAVE_KB)) status=none 2> /dev/null
run --config.train.steps=8 --config.train.eval_every=100 > "$OUT/second.out" 2> "$OUT/second.err"
echo $? > "$OUT/second.rc"
(cd "$MNT/run/checkpoints" && find 2 -type f -print0 | sort -z | xargs -0 sha256sum) > "$OUT/after.sha"
"""


def _run_full(tmp_path, data_dir, leave_kb: int):
  if shutil.which("unshare") is None:
    pytest.skip("needs util-linux unshare (a private mount namespace for a small tmpfs)")
  out = tmp_path / "out"
  (tmp_path / "mnt").mkdir()
  out.mkdir()
  env = {"MNT": str(tmp_path / "mnt"), "OUT": str(out), "PY": sys.executable, "DATA": str(data_dir),
         "RECIPE": str(tiny.ROOT / "configs/quickstart.py:tiny"), "LEAVE_KB": str(leave_kb)}
  env = {**os.environ, **env}
  proc = subprocess.run(["unshare", "--mount", "--map-root-user", "bash", "-c", SCRIPT], env=env, cwd=tiny.ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  if proc.returncode == 77 or "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
    pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {proc.stderr.strip()[:200]}")
  assert proc.returncode == 0, proc.stderr[-2000:] + (out / "first.err").read_text()[-2000:]
  return out


def _one_error_line(out) -> str:
  assert (out / "second.rc").read_text().strip() == "1"
  err = (out / "second.err").read_text()
  assert "Traceback" not in err, err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-3000:]
  assert (out / "after.sha").read_text() == (out / "before.sha").read_text()  # step 2 byte-identical
  assert (out / "before.sha").read_text().count("\n") > 5
  return errors[0]


def test_full_disk_at_checkpoint_time_names_the_failed_and_the_intact_step(tmp_path, data_dir):
  error = _one_error_line(_run_full(tmp_path, data_dir, leave_kb=400))  # room for metrics, not a checkpoint
  # The checkpoint of step 4 fails; under load the metrics record written just before it may hit the full disk
  # first. Either way the line names what failed and the intact step.
  assert ("could not write the checkpoint of step 4" in error or "metrics.jsonl" in error), error
  assert "the disk is full" in error, error
  assert "the newest intact checkpoint is step 2" in error, error


def test_a_disk_full_from_the_start_is_one_error_line(tmp_path, data_dir):
  error = _one_error_line(_run_full(tmp_path, data_dir, leave_kb=0))
  assert "--workdir" in error and "No space left on device" in error, error


@pytest.mark.parametrize("what", ["metrics", "results"])
def test_a_failed_metrics_or_results_write_names_the_file_and_the_intact_step(what, tmp_path, data_dir,
                                                                             monkeypatch):
  """The disk fills after the checkpoint of step 2: the next metrics record (or the results) cannot be written."""
  cfg = tiny.tiny_config(data_dir, steps=4)
  cfg.train.checkpoint_every, cfg.train.log_every = 2, 2
  cfg.evals = {"emoji": dict(type="retrieval", dataset="emoji", split="test")}
  calls = []
  if what == "metrics":  # the record of step 2 is written, the one of step 4 is not
    write = metrics.MetricWriter.write

    def full_after_the_first(self, *args):
      calls.append(1)
      if len(calls) > 1:
        raise OSError(errno.ENOSPC, "No space left on device")
      return write(self, *args)

    monkeypatch.setattr(metrics.MetricWriter, "write", full_after_the_first)
  else:
    write_text = pathlib.Path.write_text

    def full_for_results(self, *args, **kwargs):
      if self.name == "eval_results.json.tmp":
        raise OSError(errno.ENOSPC, "No space left on device")
      return write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_for_results)
  name = "metrics.jsonl" if what == "metrics" else "eval_results.json"
  with pytest.raises(errors.TrainingError, match=rf"could not write .*{name} \(the disk is full\); the newest "
                     r"intact checkpoint is step 2 "):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"))
