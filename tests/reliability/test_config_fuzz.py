"""Bad input is one `error:` line: a generated fuzz of malformed configs, recipe files and flags (docs/reliability.md).

Every case must end in exactly one line beginning `error:` that names the field or flag, with no traceback and a
non-zero exit. Config cases run in this process through the checks the command line runs before anything compiles
(`config_schema.validate`, then `build_experiment`'s `prepare_workdir`, `make_mesh` and `check_config`, on the 8
fake CPU devices), inside `errors.exit_on_user_error`, the handler of the entry point. Flag and recipe-file cases
run `big_embed.main.run()` for real, each in a child forked from one driver process (this file run as a script)
that has imported `big_embed.main` but not JAX, so that interpreter start-up is paid once.

The bad values are written here from the documented ranges (the issue's list), not read from the schema.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parents[2]
NAN, INF = math.nan, math.inf

# Field -> the kind of range the issue asks for; each kind's bad values are below.
RANGES = {
    "seed": "int0", "eval_batch_size": "int1",
    "mesh.fsdp": "int1", "mesh.tensor": "int1",
    "train.batch_size": "int1", "train.steps": "int1", "train.learning_rate": "positive",
    "train.warmup_steps": "int0", "train.final_lr_fraction": "unit", "train.weight_decay": "non_negative",
    "train.b1": "unit_open", "train.b2": "unit_open", "train.grad_clip_norm": "non_negative",
    "train.embed_chunk_size": "int0", "train.log_every": "int1", "train.eval_every": "int1",
    "train.checkpoint_every": "int1", "train.keep_checkpoints": "int1", "train.max_bad_steps": "int1",
    "distributed.initialization_timeout_s": "int1", "distributed.heartbeat_timeout_s": "int1",
    "model.image_size": "int1", "model.patch_size": "int1", "model.embed_dim": "int1",
    "model.vision.depth": "int1", "model.vision.width": "int1", "model.text.num_heads": "int1",
    "model.text.mlp_dim": "int1", "model.vision.dropout": "unit_open", "model.text.attention_dropout": "unit_open",
    "model.text_pretrained_layers": "int0", "data.mismatched_fraction": "unit", "data.num_threads": "int1",
    "data.worker_count": "int0", "data.prefetch_buffer_size": "int1",
}
BAD_VALUES = {
    "int0": (-1, 2.5, "3"),
    "int1": (0, -2, 1.5, "4", True),
    "positive": (0.0, -1e-3, INF, NAN, "1e-3"),
    "non_negative": (-0.5, NAN, INF),
    "unit": (-0.1, 1.5, NAN),
    "unit_open": (-0.1, 1.0, NAN, INF),
}
# Values at the edges of the same ranges that must pass (so the checks are not simply "reject everything").
GOOD_VALUES = [("train.b1", 0.0), ("train.b2", 0.999), ("train.final_lr_fraction", 1.0), ("train.weight_decay", 0.0),
               ("train.grad_clip_norm", 0.0), ("train.warmup_steps", 0), ("train.keep_checkpoints", 1),
               ("model.vision.dropout", 0.5), ("distributed.heartbeat_timeout_s", 1), ("mesh.data", -1),
               ("distributed.coordinator_bind_address", "0.0.0.0:1234")]


def _put(config, path: str, value) -> None:
  """Sets config.<path> to `value` whatever its type (as a recipe writing a plain dict would)."""
  *parents, leaf = path.split(".")
  node = config
  for name in parents:
    node = node[name]
  with node.unlocked():
    if leaf in node:
      del node[leaf]
    node[leaf] = value


def _image_cases() -> list[tuple[str, str, dict]]:
  """(case id, text the error must name, {path: value} on the tiny quickstart recipe)."""
  cases = [(f"{path}={value!r}", path, {path: value})
           for path, kind in RANGES.items() for value in BAD_VALUES[kind]]
  cases += [
      ("mesh.data=0", "config.mesh.data", {"mesh.data": 0}),
      ("mesh.data=-2", "config.mesh.data", {"mesh.data": -2}),
      ("mesh.data=3 (8 devices)", "config.mesh", {"mesh.data": 3}),
      ("dtype=float13", "config.model.dtype", {"model.dtype": "float13"}),
      ("remat=all", "config.model.remat", {"model.remat": "all"}),
      ("scan_layers='yes'", "config.model.scan_layers", {"model.scan_layers": "yes"}),
      ("scan_layers=1", "config.model.scan_layers", {"model.scan_layers": 1}),
      ("model.type=tree", "config.model.type", {"model.type": "tree"}),
      ("text_pretrained=3", "config.model.text_pretrained", {"model.text_pretrained": 3}),
      ("data_dir=None", "config.data.data_dir", {"data.data_dir": None}),
      ("coordinator_bind_address=5", "config.distributed.coordinator_bind_address",
       {"distributed.coordinator_bind_address": 5}),
      ("sharding_rules=5", "config.sharding_rules", {"sharding_rules": 5}),
      ("sharding rule of 3", "config.sharding_rules", {"sharding_rules": (("embed", "fsdp", "x"),)}),
      ("sharding rule 'embed'", "config.sharding_rules", {"sharding_rules": ("embed",)}),
      ("sharding rule to a bad axis", "config.sharding_rules", {"sharding_rules": (("embed", "model"),)}),
      ("mesh.tensor=3 (8 devices)", "config.mesh", {"mesh.tensor": 3}),
      ("bind address without port", "config.distributed.coordinator_bind_address",
       {"distributed.coordinator_bind_address": "0.0.0.0"}),
      ("bind address port 70000", "config.distributed.coordinator_bind_address",
       {"distributed.coordinator_bind_address": "127.0.0.1:70000"}),
      ("patch 5 of 16 px", "config.model.patch_size", {"model.patch_size": 5}),
      ("3 heads of width 32", "config.model.vision.num_heads", {"model.vision.num_heads": 3}),
      ("typo train.stepz", "config.train.stepz", {"train.stepz": 3}),
      ("typo vision.dpeth", "config.model.vision.dpeth", {"model.vision.dpeth": 2}),
      ("typo top-level trian", "config.trian", {"trian": {}}),
      ("typo distributed.heartbeat_timeout", "config.distributed.heartbeat_timeout",
       {"distributed.heartbeat_timeout": 5}),
      ("typo data.mixtur", "config.data.mixtur", {"data.mixtur": {"emoji": 1.0}}),
      ("mixture weight -1", "config.data.mixture.emoji", {"data.mixture": {"emoji": -1.0, "fashion_mnist": 1.0}}),
      ("mixture weight nan", "config.data.mixture.emoji", {"data.mixture": {"emoji": NAN, "fashion_mnist": 1.0}}),
      ("mixture weight 0", "config.data.mixture.fashion_mnist", {"data.mixture": {"emoji": 1.0, "fashion_mnist": 0.0}}),
      ("mixture weight inf", "config.data.mixture.emoji", {"data.mixture": {"emoji": INF}}),
      ("mixture weight 'half'", "config.data.mixture.emoji", {"data.mixture": {"emoji": "half"}}),
      ("mixture name a/x", "config.data.mixture", {"data.mixture": {"a/x": 1.0}}),
      ("mixture name ''", "config.data.mixture", {"data.mixture": {"": 1.0}}),
      ("mixture not a dict", "config.data.mixture", {"data.mixture": "emoji"}),
      ("teacher output key ''", "config.teacher.outputs.image", {"teacher.outputs": {"image": ""}}),
      ("loss name typo", "config.loss.name", {"loss.name": "clipp"}),
      ("loss field typo", "config.loss.temperture", {"loss.temperture": 0.1}),
      ("loss temperature nan", "config.loss.temperature", {"loss.temperature": NAN}),
      ("loss temperature -1", "config.loss.temperature", {"loss.temperature": -1.0}),
      ("loss temperature 'warm'", "config.loss.temperature", {"loss.temperature": "warm"}),
      ("loss tile_size 0", "config.loss.tile_size", {"loss.tile_size": 0}),
      ("loss key_mode", "config.loss.key_mode", {"loss.key_mode": "ring2"}),
      ("loss max_logit_scale nan", "config.loss.max_logit_scale", {"loss.max_logit_scale": NAN}),
      ("loss learnable 'yes'", "config.loss.learnable_temperature", {"loss.learnable_temperature": "yes"}),
      ("eval type typo", "config.evals.emoji.type", {"evals.emoji": {"type": "retrival", "dataset": "emoji"}}),
      ("eval unknown key", "config.evals.emoji.datset",
       {"evals.emoji": {"type": "retrieval", "datset": "emoji", "dataset": "emoji", "split": "test"}}),
      ("eval ignored key", "config.evals.fashion_mnist.classes",
       {"evals.fashion_mnist": {"type": "zero_shot", "dataset": "fashion_mnist", "split": "test", "classes": 3}}),
      ("eval without dataset", "config.evals.emoji.dataset", {"evals.emoji": {"type": "retrieval", "split": "test"}}),
      ("eval dataset ''", "config.evals.emoji.dataset",
       {"evals.emoji": {"type": "retrieval", "dataset": "", "split": "test"}}),
      ("eval split ''", "config.evals.emoji.split",
       {"evals.emoji": {"type": "retrieval", "dataset": "emoji", "split": ""}}),
      ("eval without type", "config.evals.emoji", {"evals.emoji": {"dataset": "emoji", "split": "test"}}),
      ("eval not a dict", "config.evals.emoji", {"evals.emoji": 5}),
      ("eval name a/x", "config.evals", {"evals": {"a/x": {"type": "retrieval", "dataset": "emoji",
                                                             "split": "test"}}}),
  ]
  return cases


def _text_cases() -> list[tuple[str, str, dict]]:
  """Cases on the tiny text_retrieval recipe (a random-init BERT; caught before its data is read)."""
  task = "config.data.tasks"
  return [
      ("bert.hidden_size=0", "config.model.bert.hidden_size", {"model.bert.hidden_size": 0}),
      ("bert.num_heads=-1", "config.model.bert.num_heads", {"model.bert.num_heads": -1}),
      ("bert 33 wide, 2 heads", "config.model.bert.num_heads", {"model.bert.hidden_size": 33}),
      ("max_text_len > positions", "config.model.max_text_len", {"model.max_text_len": 600}),
      ("max_text_len=1", "config.model.max_text_len", {"model.max_text_len": 1}),
      ("text dropout 1.0", "config.model.dropout", {"model.dropout": 1.0}),
      ("pooling=max", "config.model.pooling", {"model.pooling": "max"}),
      ("num_layers=-1", "config.model.num_layers", {"model.num_layers": -1}),
      ("task weight -1", f"{task}.", {"task.weight": -1.0}),
      ("task weight nan", f"{task}.", {"task.weight": NAN}),
      ("task batch_size -4", f"{task}.", {"task.batch_size": -4}),
      ("task num_negatives -1", f"{task}.", {"task.num_negatives": -1}),
      ("task max_records 0.5", f"{task}.", {"task.max_records": 0.5}),
      ("task type ranking", f"{task}.", {"task.type": "ranking"}),
      ("task field typo", f"{task}.", {"task.wieght": 1.0}),
      ("task name a/b", task, {"data.tasks": {"a/b": {"type": "retrieval"}}}),
  ]


def _apply(config, changes: dict) -> None:
  task = next(iter(config.data.tasks)) if "tasks" in config.data and config.data.tasks else None
  for path, value in changes.items():
    _put(config, path.replace("task.", f"data.tasks.{task}.", 1) if path.startswith("task.") else path, value)


def _checks(config, workdir) -> None:
  """What the command line runs on a config before anything compiles (main.main, then build_experiment)."""
  from big_embed import config_schema  # pylint: disable=g-import-not-at-top
  from big_embed.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from big_embed.train import experiment  # pylint: disable=g-import-not-at-top
  config_schema.validate(config)
  experiment.prepare_workdir(workdir)
  experiment.check_config(config, mesh_lib.make_mesh(config.mesh.to_dict()))


def _outcome(config, workdir) -> tuple[str, str]:
  """("error", the stderr lines) | ("traceback", the exception) | ("accepted", "") of `_checks` inside the entry
  point's handler."""
  from big_embed import errors  # pylint: disable=g-import-not-at-top
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err), errors.exit_on_user_error():
      _checks(config, workdir)
  except SystemExit as exit_:
    return ("error" if exit_.code == 1 else "accepted"), err.getvalue()
  except Exception as exc:  # pylint: disable=broad-except  (what the fuzz counts as a traceback)
    return "traceback", f"{type(exc).__name__}: {exc}"
  return "accepted", ""


def _one_error_line(stderr: str) -> str | None:
  lines = [l for l in re.split(r"[\r\n]", stderr) if l.strip()]
  if len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr:
    return lines[0]
  return None


def _tally(results: list[tuple[str, str, str, str]], what: str) -> None:
  """results: (case, kind, output, must name). Prints the counts; fails listing every case that is not a
  one-line error naming its field."""
  bad, counts = [], {"one-line errors": 0, "tracebacks": 0, "accepted": 0, "other output": 0}
  for case, kind, output, name in results:
    line = _one_error_line(output) if kind == "error" else None
    if line is not None and name in line:
      counts["one-line errors"] += 1
      continue
    counts[{"traceback": "tracebacks", "accepted": "accepted"}.get(kind, "other output")] += 1
    bad.append(f"{case}: {kind}: {output.strip()[-400:]!r} (must name {name!r})")
  print(f"\nconfig fuzz, {what}: {len(results)} cases; " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
  assert not bad, "\n".join(bad)


def test_malformed_configs_are_one_error_line_naming_the_field(tmp_path):
  from tests import tiny  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  results = []
  no_data = tmp_path / "no_data"  # the text tasks' datasets are read only after every config check
  no_data.mkdir()
  for recipe, cases in (("quickstart", _image_cases()), ("text_retrieval", _text_cases())):
    baseline = tiny.recipe(recipe, "tiny")
    baseline.data.data_dir = str(no_data)
    kind, output = _outcome(baseline, tmp_path / "wd")  # the unchanged recipe passes every config check
    assert (kind, output) == ("accepted", "") if recipe == "quickstart" else (
        kind == "error" and "Dataset 'bible' is not prepared" in output), (recipe, kind, output)
    for case, name, changes in cases:
      config = tiny.recipe(recipe, "tiny")
      config.data.data_dir = str(no_data)
      _apply(config, changes)
      kind, output = _outcome(config, tmp_path / "wd")
      results.append((f"{recipe}: {case}", kind, output, name))
  for path, value in GOOD_VALUES:
    config = tiny.recipe("quickstart", "tiny")
    _apply(config, {path: value})
    assert _outcome(config, tmp_path / "wd") == ("accepted", ""), (path, value)
  print(f"\n{len(GOOD_VALUES)} edge values accepted; {time.perf_counter() - start:.1f} s in process")
  assert len(results) >= 100
  _tally(results, "in process")


def test_workdir_must_be_a_directory_path(tmp_path):
  from tests import tiny  # pylint: disable=g-import-not-at-top
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  results = []
  for case, workdir in (("empty", ""), ("blank", "  "), ("a file", a_file), ("under a file", a_file / "wd")):
    kind, output = _outcome(tiny.recipe("quickstart", "tiny"), workdir)
    results.append((f"--workdir {case}", kind, output, "--workdir"))
  _tally(results, "workdir")
  assert a_file.read_text() == "not a directory"


# --------------------------------------------------------------------------------------------------------------
# Flags and recipe files: `big_embed.main.run()` itself.

RECIPES = {
    "missing": None,
    "syntax_error": "def get_config(arg=None:\n  return None\n",
    "raises": "def get_config(arg=None):\n  raise RuntimeError('the recipe broke')\n",
    "bad_import": "import no_such_module_for_big_embed\n",
    "no_get_config": "CONFIG = {}\n",
    "returns_int": "def get_config(arg=None):\n  return 5\n",
    "value_error": "from big_embed import config_utils as cu\n\ndef get_config(arg=None):\n"
                   "  c = cu.base_config('two_tower')\n  c.train.steps = int('many')\n  return c\n",
}


def _flag_cases(tmp_path: pathlib.Path) -> list[tuple[str, list[str], str]]:
  """(case id, argv after the program name, text the error must name)."""
  for name, text in RECIPES.items():
    if text is not None:
      (tmp_path / f"{name}.py").write_text(text)
  (tmp_path / "a_file").write_text("x")
  quick = str(ROOT / "configs" / "quickstart.py")
  wd = ["--workdir", str(tmp_path / "wd")]
  cases = [(f"recipe {name}", ["--config", str(tmp_path / f"{name}.py"), *wd], f"--config {tmp_path / name}.py")
           for name in RECIPES]
  cases += [
      ("recipe is a directory", ["--config", str(tmp_path), *wd], "--config"),
      ("recipe argument rejected", [f"--config={quick}:tiyn", *wd], "tiyn"),
      ("no --config", wd, "--config"),
      ("--mode=trian", [f"--config={quick}:tiny", *wd, "--mode=trian"], "--mode"),
      ("--workdir=", [f"--config={quick}:tiny", "--workdir="], "--workdir"),
      ("no --workdir", [f"--config={quick}:tiny"], "--workdir"),
      ("--workdir a file", [f"--config={quick}:tiny", "--workdir", str(tmp_path / "a_file")], "--workdir"),
      ("positional argument", [f"--config={quick}:tiny", *wd, "train"], "unexpected arguments: train"),
      ("unknown flag", [f"--config={quick}:tiny", *wd, "--stepz=3"], "stepz"),
      ("override typo", [f"--config={quick}:tiny", *wd, "--config.train.stepz=3"], "stepz"),
      ("override type", [f"--config={quick}:tiny", *wd, "--config.train.steps=many"], "config.train.steps"),
      ("override range", [f"--config={quick}:tiny", *wd, "--config.train.b2=1"], "config.train.b2"),
      ("override dtype", [f"--config={quick}:tiny", *wd, "--config.model.dtype=float13"], "config.model.dtype"),
      ("override keep 0", [f"--config={quick}:tiny", *wd, "--config.train.keep_checkpoints=0"],
       "config.train.keep_checkpoints"),
      ("override lr inf", [f"--config={quick}:tiny", *wd, "--config.train.learning_rate=inf"],
       "config.train.learning_rate"),
      ("--num_processes=x", [f"--config={quick}:tiny", *wd, "--num_processes=x"], "--num_processes"),
  ]
  return cases


def _drive(argvs: list[list[str]]) -> list[dict]:
  """Runs `big_embed.main.run()` on each argv in a child forked from this process (which must not have started
  JAX); returns each child's exit code and stderr."""
  import big_embed.main  # pylint: disable=g-import-not-at-top,unused-import  (flags defined once, before forking)
  assert "jax" not in sys.modules, "fork before JAX loads"
  out = []
  for argv in argvs:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: stderr into the pipe, then the entry point
      os.close(read)
      os.dup2(write, 2)
      sys.stderr = os.fdopen(2, "w", closefd=False)
      sys.argv = ["big_embed.main", *argv]
      code = 0
      try:
        big_embed.main.run()
      except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
      except BaseException:  # pylint: disable=broad-except  (a traceback: print it, as the interpreter would)
        import traceback  # pylint: disable=g-import-not-at-top
        traceback.print_exc()
        code = 1
      sys.stderr.flush()
      os._exit(code)  # pylint: disable=protected-access
    os.close(write)
    with os.fdopen(read) as pipe:
      stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    out.append({"code": os.waitstatus_to_exitcode(status), "stderr": stderr})
  return out


def test_bad_flags_and_recipe_files_are_one_error_line(tmp_path):
  cases = _flag_cases(tmp_path)
  start = time.perf_counter()
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, __file__, json.dumps([argv for _, argv, _ in cases])], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  runs = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"\n{len(cases)} command lines in one driver process: {time.perf_counter() - start:.1f} s")
  results = []
  for (case, _, name), run in zip(cases, runs):
    kind = "error" if run["code"] in (1, 2) else ("accepted" if run["code"] == 0 else "other")
    if "Traceback" in run["stderr"]:
      kind = "traceback"
    results.append((case, kind, run["stderr"], name))
  _tally(results, "flags and recipe files")
  # The real entry point once, as a user types it: one interpreter, `python -m big_embed.main`.
  proc = subprocess.run([sys.executable, "-m", "big_embed.main", "--config", str(tmp_path / "missing.py"),
                         "--workdir", str(tmp_path / "wd")], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 2 and _one_error_line(proc.stderr) is not None, proc.stderr[-3000:]
  assert "no such recipe file" in proc.stderr


if __name__ == "__main__":  # the driver of test_bad_flags_and_recipe_files_are_one_error_line
  print(json.dumps(_drive(json.loads(sys.argv[1]))))
