"""Every kind of damage to the newest checkpoint: training and `--mode eval` fall back to the previous intact one.

A tiny run writes checkpoints at steps 2 and 4. For each kind of damage to step 4, on a copy of the run:
`--mode eval` warns in one line naming step 4 and evaluates step 2; training warns the same way, moves step 4
aside into checkpoints/damaged/, resumes from step 2 and writes a new step 4 bitwise equal to the undamaged one
(its recorded fingerprints equal the original's); step 2's files are byte-identical afterwards.
"""

import hashlib
import json
import os
import pathlib
import shutil

import pytest

from big_embed import checkpoint as ckpt_lib
from big_embed.train import loop
from tests import tiny

STEPS, EVERY = 4, 2
# Orbax leaves the coroutines of a failed read unawaited; Python reports them when they are collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _config(data_dir):
  cfg = tiny.tiny_config(data_dir, steps=STEPS)
  cfg.train.checkpoint_every = EVERY
  cfg.train.keep_checkpoints = 3
  cfg.evals = {"emoji": dict(type="retrieval", dataset="emoji", split="test")}  # one small evaluator
  return cfg


def _meta(workdir, step) -> dict:
  return json.loads((pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def _file_hashes(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("reference")
  loop.train_and_evaluate(_config(data_dir), str(workdir))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  return workdir


# -- the kinds of damage, applied to a step directory ------------------------------------------------------------

def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _edit(path: pathlib.Path, edit):
  data = bytearray(path.read_bytes())
  edit(data)
  path.write_bytes(bytes(data))


def _flip_bytes(data):
  for i in range(len(data) // 2, len(data) // 2 + 16):
    data[i] ^= 0xFF


def _flip_one_bit(data):
  data[len(data) // 2] ^= 0x10


def _garble(data):
  data[len(data) // 3:len(data) // 3 + 8] = b"#garble#"


DAMAGE = {
    "bytes_flipped_in_a_data_file": lambda d: _edit(_largest_data_file(d), _flip_bytes),
    "one_bit_flipped_in_a_data_file": lambda d: _edit(_largest_data_file(d), _flip_one_bit),
    "data_file_truncated": lambda d: os.truncate(_largest_data_file(d), _largest_data_file(d).stat().st_size // 2),
    "data_file_zeroed": lambda d: _largest_data_file(d).write_bytes(bytes(_largest_data_file(d).stat().st_size)),
    "data_file_deleted": lambda d: _largest_data_file(d).unlink(),
    "array_metadata_deleted": lambda d: (d / "state" / "_METADATA").unlink(),
    "array_metadata_garbled": lambda d: _edit(d / "state" / "_METADATA", _garble),
    "meta_deleted": lambda d: (d / "meta" / "metadata").unlink(),
    "meta_garbled": lambda d: _edit(d / "meta" / "metadata", _garble),
    "data_iterator_state_garbled": lambda d: _edit(next((d / "data_iter").glob("process_*.json")),
                                                   lambda b: b.__setitem__(slice(None), b.replace(b"4", b"7"))),
    "empty_step_directory": lambda d: (shutil.rmtree(d), d.mkdir()),
}


def _damaged_copy(reference, tmp_path, kind) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = _file_hashes(workdir / "checkpoints" / "4")
  DAMAGE[kind](workdir / "checkpoints" / "4")
  assert _file_hashes(workdir / "checkpoints" / "4") != before, f"{kind} changed nothing"
  return workdir


def _warnings(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith("warning: the checkpoint of step")]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_eval_and_training_fall_back_to_the_previous_intact_checkpoint(kind, reference, tmp_path, data_dir,
                                                                      capfd):
  workdir = _damaged_copy(reference, tmp_path, kind)
  step2 = _file_hashes(workdir / "checkpoints" / "2")

  # --mode eval: one warning naming step 4, then step 2 is evaluated; nothing is moved or deleted.
  loop.evaluate_checkpoint(_config(data_dir), str(workdir))
  out, err = capfd.readouterr()
  (warning,) = _warnings(err)
  assert "step 4" in warning and "damaged" in warning and "skipped" in warning, warning
  assert json.loads((workdir / "eval_results.json").read_text())["step"] == 2
  assert "Results at step 2" in out
  assert (workdir / "checkpoints" / "4").is_dir()

  # Training: the same warning, step 4 moved aside, resumed from step 2, step 4 rewritten bitwise equal.
  loop.train_and_evaluate(_config(data_dir), str(workdir))
  out, err = capfd.readouterr()
  (warning,) = _warnings(err)
  assert "step 4" in warning and "moved to" in warning, warning
  assert "Resumed from the checkpoint at step 2" in out
  assert (workdir / "checkpoints" / ckpt_lib.DAMAGED / "4").is_dir()
  assert _meta(workdir, 4)["fingerprints"] == _meta(reference, 4)["fingerprints"]
  assert _file_hashes(workdir / "checkpoints" / "2") == step2


def test_no_intact_checkpoint_is_one_error_and_nothing_is_deleted(reference, tmp_path, data_dir):
  workdir = _damaged_copy(reference, tmp_path, "meta_garbled")
  DAMAGE["data_file_truncated"](workdir / "checkpoints" / "2")
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no intact checkpoint .*step\(s\) 4, 2 are damaged"):
    loop.evaluate_checkpoint(_config(data_dir), str(workdir))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no intact checkpoint .*moved to .*damaged"):
    loop.train_and_evaluate(_config(data_dir), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints" / ckpt_lib.DAMAGED).iterdir()) == ["2", "4"]


def test_a_checkpoint_of_another_model_is_a_config_error_not_damage(reference, tmp_path, data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  cfg = _config(data_dir)
  cfg.model.embed_dim = 64
  with pytest.raises(ckpt_lib.ConfigError, match=r"does not match this config: .* has shape"):
    loop.evaluate_checkpoint(cfg, str(workdir))
  assert not (workdir / "checkpoints" / ckpt_lib.DAMAGED).exists()
