"""The training loop and `--mode eval`: resume, step, log, evaluate, checkpoint, stop cleanly.

The run is assembled by `train/experiment.py`; this module only drives it.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal

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
from big_embed.train import compile_only
from big_embed.train import experiment as experiment_lib
from big_embed.train import step_cost
from big_embed.train import teacher as teacher_lib
from big_embed.train.experiment import Experiment


def _write_results(exp: Experiment, step: int, results: dict) -> pathlib.Path:
  path = exp.workdir / "eval_results.json"
  if jax.process_index() == 0:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": int(step), **results}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
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
  """SIGTERM as a flag the loop checks between steps (then it saves a checkpoint and exits cleanly).

  With several processes, all must stop at the same step: JAX's preemption sync point (which listens for
  SIGTERM once `jax.distributed` is initialised) agrees on one.
  """

  def __init__(self):
    self._flag = False
    self._previous = signal.signal(signal.SIGTERM, self._handle) if jax.process_count() == 1 else None

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _restore_state(exp: Experiment, step: int, data_iter=None):
  layers.check_same_layout(exp.checkpointer.restore_meta(step)["config"]["model"], exp.config.model)
  abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
  try:
    state, _ = exp.checkpointer.restore(step, abstract, data_iter)
  except (ValueError, KeyError) as err:
    raise ConfigError(f"the checkpoint in {exp.checkpointer.directory} does not match this config ({err}); "
                      "use a new --workdir for a different model") from err
  return state


def _check_finite(exp: Experiment, checked: list[tuple[int, float, float]]) -> None:
  """Stops the run at the first step whose loss or gradient norm is not finite.

  `checked`: (step, loss, grad_norm) of every step since the last check. The loss of step t is computed from the
  parameters after step t - 1, so a non-finite loss at step t condemns the checkpoint of step t - 1 (a resumed
  run would replay the same batch on the same parameters); a non-finite gradient norm condemns step t's own
  update. Condemned checkpoints are removed, so that rerunning with a lower learning rate resumes from the last
  good one.

  Raises:
    TrainingError: naming the step, the fix, and the checkpoint a rerun resumes from.
  """
  for step, loss, grad_norm in checked:
    if math.isfinite(loss) and math.isfinite(grad_norm):
      continue
    what, first_bad = (f"the loss became {loss}", step - 1) if not math.isfinite(loss) else (
        f"the gradient norm became {grad_norm}", step)
    ckpt = exp.checkpointer
    ckpt.wait()
    removed = [s for s in ckpt.all_steps() if s >= first_bad]
    for s in removed:
      ckpt.delete(s)
    latest = ckpt.latest_step()
    kept = (f"the last good checkpoint (step {latest}) in {ckpt.directory} is kept" if latest is not None else
            f"no checkpoint before it is kept in {ckpt.directory}: a rerun starts from scratch")
    gone = f"the checkpoint(s) of step {', '.join(map(str, removed))} were removed (their parameters give it); " \
        if removed else ""
    raise TrainingError(f"{what} at step {step}; lower config.train.learning_rate (now "
                        f"{exp.config.train.learning_rate}) or config.train.grad_clip_norm and rerun; {gone}{kept}")


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
  start = ckpt.latest_step()
  # The data position resumes exactly when the process count is unchanged (each process owns a data shard).
  # Otherwise the shards differ; the stream restarts with a seed that depends on the step.
  exact_data = start is None or ckpt.restore_meta(start).get("process_count", 1) == jax.process_count()
  data_seed = exp.config.seed if exact_data else exp.config.seed + start
  data_iter = iter(experiment_lib.make_train_stream(exp, data_seed))

  if start is None:
    state, start = experiment_lib.initial_state(exp), 0
  else:
    state = _restore_state(exp, start, data_iter if exact_data else None)
    print(f"Resumed from the checkpoint at step {start} in {ckpt.directory}", flush=True)
    if not exact_data:
      print("Warning: the checkpoint was written by a different number of processes; the input stream "
            f"restarts with data seed {data_seed} (parameters and optimizer state resume exactly)", flush=True)

  teacher = None
  if exp.config.teacher.workdir:
    teacher = teacher_lib.load_teacher(exp.config.teacher, exp.mesh, exp.tokenizer)
    print(f"Teacher: {exp.config.teacher.workdir} (step {teacher.step})", flush=True)
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
  pbar = tqdm.tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
  try:
    while step < cfg.steps:
      item = next(data_iter)
      task, local = item if isinstance(item, tuple) else (None, item)  # text: (task type, batch)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
      with window.paused():  # compiles on the first batch of each task type and shape
        executable = train_step.executable(batch, task)
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
        _check_finite(exp, [(s, m["loss"], m["grad_norm"]) for s, m in fetched])
        scalars = window.record(fetched)
        window.reset()
        writer.write(step, scalars)
        pbar.set_postfix(_progress(scalars))
      if eval_now or save_now:
        jax.block_until_ready(metrics)  # the steps so far are step time, what follows is not
      if eval_now:
        with window.paused():
          results = evaluate.run_evaluators(evaluators, state.params["model"])
          writer.write(step, metrics_lib.flatten(results, "eval"))
          _write_results(exp, step, results)
      if save_now:
        with window.paused():
          ckpt.save(step, state, _meta(exp, step), data_iter, force=True)
      if stopping and not is_last:
        ckpt.wait()
        print(f"Stopped by SIGTERM at step {step}; checkpoint saved in {ckpt.directory}. "
              "Rerun the same command to resume.", flush=True)
        return results
  finally:
    pbar.close()
    stop.restore()
    writer.close()
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
  step = exp.checkpointer.latest_step()
  source = exp.kind.pretrained_source(exp.config.model)
  try:
    if step is None and source:
      print(f"No checkpoint in {exp.checkpointer.directory}: evaluating the pretrained model {source!r} as loaded",
            flush=True)
      state, step = experiment_lib.initial_state(exp), 0
    elif step is None:
      raise ConfigError(f"no checkpoint in {exp.checkpointer.directory}; train first with --mode train")
    else:
      state = _restore_state(exp, step)
    results = evaluate.run_evaluators(experiment_lib.build_evaluators(exp), state.params["model"])
  finally:
    exp.checkpointer.close()
  path = _write_results(exp, step, results)
  writer = metrics_lib.MetricWriter(exp.workdir)
  try:
    writer.write(step, metrics_lib.flatten(results, "eval"))
  finally:
    writer.close()
  print(f"\nResults at step {step}:\n{format_results(results)}\nWritten to {path} (and metrics.jsonl, tensorboard/)",
        flush=True)
  return results
