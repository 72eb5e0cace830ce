"""The training loop and `--mode eval`: resume, step, log, evaluate, checkpoint, stop cleanly.

The run is assembled by `train/experiment.py`; this module only drives it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import sys

import jax
from jax.experimental import multihost_utils
import ml_collections
from tqdm import auto as tqdm

from big_embed import checkpoint as ckpt_lib
from big_embed import evaluate
from big_embed import metrics as metrics_lib
from big_embed.errors import ConfigError, TrainingError
from big_embed.models import layers
from big_embed.parallel import mesh as mesh_lib
from big_embed.parallel import multihost
from big_embed.train import compile_only
from big_embed.train import experiment as experiment_lib
from big_embed.train import step_cost
from big_embed.train import teacher as teacher_lib
from big_embed.train.experiment import Experiment


def _writing(what: pathlib.Path, ckpt: ckpt_lib.Checkpointer, write, *args):
  """`write(*args)`; a failed write (full or read-only disk) stops the run with one line naming the file and
  the newest intact checkpoint."""
  try:
    return write(*args)
  except OSError as err:
    ckpt.wait()  # a background save that failed on the same disk came first: then that is the error
    raise TrainingError(f"could not write {what} ({ckpt_lib.why_failed(err)}); {ckpt.newest_intact()} in "
                        f"{ckpt.directory}; free space there (or use another --workdir) and rerun the same command "
                        "to resume") from err


def _write_results(exp: Experiment, step: int, results: dict) -> pathlib.Path:
  path = exp.workdir / "eval_results.json"

  def write():
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": int(step), **results}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)

  if jax.process_index() == 0:
    _writing(path, exp.checkpointer, write)
  return path


def format_results(results: dict[str, dict[str, float]]) -> str:
  lines = []
  for name, metrics in results.items():
    cells = "  ".join(f"{k}={v:.2f}" for k, v in metrics.items())
    lines.append(f"  {name:<16} {cells}")
  return "\n".join(lines)


def _meta(exp: Experiment, step: int) -> dict:
  return {"step": int(step), "process_count": jax.process_count(),
          "config": json.loads(exp.config.to_json_best_effort())}


class _StopSignal:
  """SIGTERM and SIGINT (Ctrl-C) as a flag the loop checks between steps (then it saves a checkpoint and exits
  cleanly); a second signal aborts at once (the newest complete checkpoint stays intact).

  With several processes, all must stop at the same step: JAX's preemption sync point (which listens for
  SIGTERM once `jax.distributed` is initialised) agrees on one; a SIGINT is passed on to it as a SIGTERM.
  """

  def __init__(self):
    self.name: str | None = None  # the signal that asked to stop
    self._multi = jax.process_count() > 1
    ours = (signal.SIGINT,) if self._multi else (signal.SIGINT, signal.SIGTERM)
    self._previous = {s: signal.signal(s, self._handle) for s in ours}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.name is not None:
      print(f"\nAborted by a second {name}; the newest complete checkpoint is intact", file=sys.stderr, flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.name = name
    print(f"\n{name}: stopping after this step with a checkpoint ({name} again: abort at once)", file=sys.stderr,
          flush=True)
    if self._multi:  # JAX's preemption notifier listens for SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.name is not None

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def _restore_state(exp: Experiment, step: int, data_iter=None):
  """The verified state of checkpoint `step` (and `data_iter` set to its position); raises
  `ckpt_lib.DamagedCheckpoint`, or ConfigError when the checkpoint belongs to another model."""
  abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  state, _ = exp.checkpointer.restore(
      step, abstract, data_iter,
      check_meta=lambda meta: layers.check_same_layout(meta["config"]["model"], exp.config.model))
  return state


def _resume(exp: Experiment, step: int):
  """(state, data iterator, whether the data position resumed exactly) from checkpoint `step`.

  The data position resumes exactly when the process count is unchanged (each process owns a data shard).
  Otherwise the shards differ; the stream restarts with a seed that depends on the step.
  """
  exact = exp.checkpointer.restore_meta(step).get("process_count", 1) == jax.process_count()
  data_iter = iter(experiment_lib.make_train_stream(exp, exp.config.seed if exact else exp.config.seed + step))
  return _restore_state(exp, step, data_iter if exact else None), data_iter, exact


def _check_finite(exp: Experiment, steps: list[tuple[int, dict[str, float]]], bad: int) -> int:
  """Counts consecutive skipped steps and stops the run at config.train.max_bad_steps of them in a row.

  The train step (train/step.py) skips a step whose loss, gradient norm or update is not finite: its parameters
  and optimizer state stay unchanged, so no checkpoint ever holds the non-finite values of a bad step and none is
  deleted. `steps`: (step, metrics) of the steps since the last check, in order; `bad`: the consecutive skipped
  steps just before them. Returns the consecutive skipped steps at the end of `steps`.

  Raises:
    TrainingError: naming the step, its loss parts, the fix, and the checkpoint a rerun resumes from.
  """
  t = exp.config.train
  for step, m in steps:
    bad = bad + 1 if m.get("skipped") else 0
    if bad < t.max_bad_steps:
      continue
    parts = " ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("skipped", "learning_rate"))
    what = "the loss or the gradient norm" if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])) \
        else "the update (the new parameters or optimizer state)"
    ckpt = exp.checkpointer
    ckpt.wait()
    latest = ckpt.intact  # the newest verified (or completely written) checkpoint
    resume = (f"a rerun resumes from the checkpoint of step {latest} in {ckpt.directory}" if latest is not None
              else f"no checkpoint is in {ckpt.directory}: a rerun starts from scratch")
    raise TrainingError(
        f"{what} was not finite at step {step} ({parts}), the last of {bad} consecutive skipped steps "
        f"(config.train.max_bad_steps={t.max_bad_steps}; the parameters are those of step {step - bad}); lower "
        f"config.train.learning_rate (now {t.learning_rate}) or config.train.grad_clip_norm (now "
        f"{t.grad_clip_norm}) and rerun; {resume}")
  return bad


def _progress(scalars: dict[str, float]) -> dict[str, str]:
  """The progress bar's postfix: window-mean loss, step time, throughput, TFLOP/s per device, MFU when known."""
  out = {"loss": f"{scalars['train/loss']:.4f}", "step_s": f"{scalars['train/step_time_sec']:.3g}",
         "samples/s": f"{scalars['train/samples_per_sec']:.0f}",
         "TFLOP/s": f"{scalars['train/device_tflops_per_sec']:.3g}"}
  if "train/mfu" in scalars:
    out["MFU"] = f"{100 * scalars['train/mfu']:.1f}%"
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains from scratch or resumes from the newest checkpoint in `workdir`; returns the final eval results."""
  exp = experiment_lib.build_experiment(config, workdir)
  cfg = exp.config.train
  ckpt = exp.checkpointer
  found = ckpt.restore_newest_intact(lambda step: _resume(exp, step), move_damaged=True)
  if found is None:
    state, start = experiment_lib.initial_state(exp), 0
    data_iter = iter(experiment_lib.make_train_stream(exp, exp.config.seed))
  else:
    start, (state, data_iter, exact_data) = found
    print(f"Resumed from the checkpoint at step {start} in {ckpt.directory}", flush=True)
    if not exact_data:
      print("Warning: the checkpoint was written by a different number of processes; the input stream "
            f"restarts with data seed {exp.config.seed + start} (parameters and optimizer state resume exactly)",
            flush=True)

  teacher = None
  if teacher_lib.is_configured(exp.config.teacher):
    teacher = teacher_lib.load_teacher(exp.config.teacher, exp.mesh, exp.tokenizer)
    print(f"Teacher: {exp.config.teacher.workdir or exp.config.teacher.pretrained} (step {teacher.step})", flush=True)
  teacher_params = teacher.params if teacher else None
  costs: list = []

  def on_compile(cost):  # once per task type and batch shape, before its first step
    costs.append(cost)
    if jax.process_index() == 0:
      print(step_cost.format_cost(cost), flush=True)
      step_cost.write_report(exp.workdir, costs)

  train_step = experiment_lib.make_train_step(exp, teacher, on_compile)
  if not exp.tasks:  # image-text: the batch shapes follow from the config, compile before the progress bar
    train_step.executable(compile_only.image_text_batch(exp.config))
  evaluators = experiment_lib.build_evaluators(exp)
  writer = metrics_lib.MetricWriter(exp.workdir)
  stop = _StopSignal()
  batch_sharding = mesh_lib.batch_sharding(exp.mesh)  # every batch leaf: leading dim over data x fsdp

  results: dict = {}
  window = metrics_lib.TrainWindow(exp.mesh.devices.flat[0].device_kind)
  step = start
  started: set[int] = set()  # ids of the executables that have run once
  bad_steps = checked = 0  # consecutive skipped steps (`_check_finite`); the window's steps it has counted
  pbar = tqdm.tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
  try:
    while step < cfg.steps:
      item = next(data_iter)
      task, local = item if isinstance(item, tuple) else (None, item)  # text: (task type, batch)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
      with window.paused():  # compiles on the first batch of each task type and shape
        executable = train_step.executable(batch, task)
        if id(executable) not in started:  # every process starts its first run together
          started.add(id(executable))
          multihost.barrier(f"big_embed/train_step/{len(started)}", exp.config.distributed.initialization_timeout_s)
      state, metrics = executable(state, batch, teacher_params)
      step += 1
      window.add(step, metrics, next(iter(batch.values())).shape[0], executable.cost.flops_per_device)
      pbar.update(1)
      is_last = step == cfg.steps
      stopping = stop.requested(step)
      save_now = step % cfg.checkpoint_every == 0 or is_last or stopping
      eval_now = step % cfg.eval_every == 0 or is_last
      if step % cfg.log_every == 0 or save_now:
        fetched = window.fetch()
        bad_steps, checked = _check_finite(exp, fetched[checked:], bad_steps), 0
        scalars = window.record(fetched)
        window.reset()
        _writing(writer.path, ckpt, writer.write, step, scalars)
        ckpt.check()  # a failed background save stops the run here, not at the next save
        pbar.set_postfix(_progress(scalars))
      elif step % cfg.max_bad_steps == 0:  # between records: the steps before the newest have run by now
        fetched = window.fetch(newest=False)
        bad_steps, checked = _check_finite(exp, fetched[checked:], bad_steps), len(fetched)
      if eval_now or save_now:
        jax.block_until_ready(metrics)  # the steps so far are step time, what follows is not
      if eval_now:
        with window.paused():
          results = evaluate.run_evaluators(evaluators, state.params["model"])
          _writing(writer.path, ckpt, writer.write, step, metrics_lib.flatten(results, "eval"))
          _write_results(exp, step, results)
      if save_now:
        with window.paused():
          ckpt.save(step, state, _meta(exp, step), data_iter)
      if stopping and not is_last:
        ckpt.wait()
        print(f"Stopped by {stop.name or 'SIGTERM'} at step {step}; checkpoint saved in {ckpt.directory}. "
              "Rerun the same command to resume.", flush=True)
        return results
  finally:
    pbar.close()
    stop.restore()
    try:
      _writing(writer.path, ckpt, writer.close)
    finally:
      ckpt.close()

  if not results:  # resumed at the last step: evaluate the final state once
    results = evaluate.run_evaluators(evaluators, state.params["model"])
    _write_results(exp, step, results)
  print(f"\nResults at step {step}:\n{format_results(results)}")
  print(f"Final evaluation: {exp.workdir / 'eval_results.json'}")
  print(f"Checkpoint:       {ckpt.directory / str(step)}")
  print(f"TensorBoard:      tensorboard --logdir {exp.workdir / 'tensorboard'}", flush=True)
  return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode eval`: evaluates the newest checkpoint in `workdir` and writes eval_results.json.

  The results are also appended to metrics.jsonl and the TensorBoard events at the checkpoint's step, as the
  evaluation record a training run writes ("eval/<evaluator>/<metric>"). With no checkpoint, a model with a
  pretrained checkpoint is evaluated as loaded (step 0).
  """
  exp = experiment_lib.build_experiment(config, workdir)
  source = exp.kind.pretrained_source(exp.config.model)
  try:
    found = exp.checkpointer.restore_newest_intact(lambda step: _restore_state(exp, step), move_damaged=False)
    if found is None and source:
      print(f"No checkpoint in {exp.checkpointer.directory}: evaluating the pretrained model {source!r} as loaded",
            flush=True)
      state, step = experiment_lib.initial_state(exp), 0
    elif found is None:
      raise ConfigError(f"no checkpoint in {exp.checkpointer.directory}; train first with --mode train")
    else:
      step, state = found
    results = evaluate.run_evaluators(experiment_lib.build_evaluators(exp), state.params["model"])
  finally:
    exp.checkpointer.close()
  path = _write_results(exp, step, results)
  writer = metrics_lib.MetricWriter(exp.workdir)
  try:
    _writing(writer.path, exp.checkpointer, writer.write, step, metrics_lib.flatten(results, "eval"))
  finally:
    _writing(writer.path, exp.checkpointer, writer.close)
  print(f"\nResults at step {step}:\n{format_results(results)}\nWritten to {path} (and metrics.jsonl, tensorboard/)",
        flush=True)
  return results
