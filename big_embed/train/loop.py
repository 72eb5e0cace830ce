"""Training and evaluation drivers: build everything from the config, train with periodic eval/checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
from tqdm import auto as tqdm

from big_embed import checkpoint as ckpt_lib
from big_embed import evaluate
from big_embed import losses
from big_embed import metrics as metrics_lib
from big_embed import models
from big_embed.data import paths as data_paths
from big_embed.data import pipeline
from big_embed.data import text_pipeline
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError, TrainingError
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import optimizer as optimizer_lib
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib
from big_embed.train import teacher as teacher_lib

TOKENIZER_FILE = data_paths.TOKENIZER_FILENAME


@dataclasses.dataclass
class Experiment:
  """Everything derived from (config, workdir) before any step runs."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data_dir: pathlib.Path
  mesh: Any
  tokenizer: Tokenizer
  model: Any
  loss_spec: losses.LossSpec
  tx: Any
  init_fn: Any
  abstract_state: Any
  state_shardings: Any
  checkpointer: ckpt_lib.Checkpointer


def _prepare_workdir(workdir: str) -> pathlib.Path:
  path = pathlib.Path(workdir).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as err:
    raise ConfigError(f"--workdir {path} is not writable ({err.strerror or err}); "
                      "pass a directory you can write to") from err
  return path


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Checks that need the mesh or cross several fields; field names and types are checked by the flags."""
  t = config.train
  shards = mesh_lib.batch_size_per_shard(mesh)
  if t.batch_size <= 0 or t.batch_size % shards:
    raise ConfigError(
        f"config.train.batch_size={t.batch_size} is not divisible by the {shards} data-parallel shards of the "
        f"mesh {dict(mesh.shape)}; use a multiple of {shards}")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  for name in ("steps", "log_every", "checkpoint_every", "eval_every"):
    if t[name] <= 0:
      raise ConfigError(f"config.train.{name} must be > 0, got {t[name]}")
  if not t.learning_rate > 0:
    raise ConfigError(f"config.train.learning_rate must be > 0, got {t.learning_rate}")
  try:
    losses.get(config.loss.name).validate(config.loss)
    models.model_type(config.model)
  except ValueError as err:
    raise ConfigError(str(err)) from err
  if config.data.get("tasks"):
    text_pipeline.validate_tasks(config.data, t.batch_size, shards, jax.process_count(), config.loss)


def _load_tokenizer(workdir: pathlib.Path, data_dir: pathlib.Path, model_config) -> Tokenizer:
  """The run's own copy (so a resumed run keeps its vocabulary); else, for a text model or a pretrained text
  side, the pretrained tokenizer (`config.model.tokenizer`, else the checkpoint's, else MiniLM's); else the one
  prepared with the data."""
  own = workdir / TOKENIZER_FILE
  if own.exists():
    return Tokenizer.from_file(str(own))
  if models.model_type(model_config) == "text" or models.pretrained_source(model_config):
    from big_embed.models import pretrained  # pylint: disable=g-import-not-at-top
    source = model_config.get("tokenizer", "") or models.pretrained_source(model_config) or "minilm"
    tok = pretrained.load_tokenizer(pretrained.resolve_pretrained(source))
  else:
    tok = tokenizer_lib.load_tokenizer(data_dir)
  if jax.process_index() == 0:  # atomically: other processes may be looking for it
    tmp = own.with_suffix(".tmp")
    tmp.write_text(tok.to_str(), encoding="utf-8")
    tmp.replace(own)
  return tok


def build_experiment(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  workdir_path = _prepare_workdir(workdir)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  validate_config(config, mesh)
  data_dir = data_paths.resolve_data_dir(config.data.data_dir or None)
  tokenizer = _load_tokenizer(workdir_path, data_dir, config.model)
  model = models.build_model(config.model, tokenizer.vocab_size)
  loss_spec = losses.get(config.loss.name)
  tx = optimizer_lib.make_optimizer(config.train)
  init_fn = state_lib.init_fn_from_config(config, model)
  abstract, shardings = state_lib.state_shardings(init_fn, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir_path / "checkpoints", max_to_keep=config.train.keep_checkpoints)
  return Experiment(config, workdir_path, data_dir, mesh, tokenizer, model, loss_spec, tx, init_fn, abstract,
                    shardings, checkpointer)


def build_evaluators(exp: Experiment) -> dict[str, Any]:
  m = exp.config.model
  encoder = evaluate.encode.Encoder(exp.model, exp.mesh, exp.config.eval_batch_size)
  ctx = evaluate.EvalContext(
      encoder=encoder, tokenizer=exp.tokenizer, data_dir=str(exp.data_dir), image_size=m.get("image_size", 0),
      max_text_len=m.max_text_len,
      encode_texts=evaluate.encode.TextEncoding(encoder, exp.tokenizer, m.max_text_len,
                                                m.get("query_prefix", ""), m.get("doc_prefix", "")))
  return evaluate.build_evaluators(exp.config.evals, ctx)


def initial_state(exp: Experiment):
  """A fresh sharded state; a model with a pretrained checkpoint (a text model's `pretrained`, a two-tower
  model's `text_pretrained`) starts from those weights."""
  state = state_lib.create_sharded_state(exp.init_fn, exp.state_shardings)
  loaded = models.pretrained_params(exp.config.model)
  if loaded is None:
    return state
  from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
  shardings = exp.state_shardings.params["model"]
  init = jax.device_get(state.params["model"])  # numpy; merged leaves are then placed shard by shard
  merged = text_embedder.merge_pretrained(init, loaded)
  params = jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx]), merged, shardings)
  return state.replace(params={**state.params, "model": params})


def make_train_stream(config: ml_collections.ConfigDict, tokenizer: Tokenizer, seed: int):
  """The process-local training stream: text tasks (`config.data.tasks`) or the image-text mixture."""
  cfg = config.train
  if config.data.get("tasks"):
    m = config.model
    return text_pipeline.make_text_train_dataset(
        config.data, tokenizer, default_batch_size=cfg.batch_size, max_text_len=m.max_text_len,
        query_prefix=m.get("query_prefix", ""), doc_prefix=m.get("doc_prefix", ""), seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.make_train_dataset(
      config.data, tokenizer, batch_size=cfg.batch_size // jax.process_count(),
      image_size=config.model.image_size, seed=seed, process_index=jax.process_index(),
      process_count=jax.process_count())


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains from scratch or resumes from the newest checkpoint in `workdir`; returns the final eval results."""
  exp = build_experiment(config, workdir)
  cfg = config.train
  ckpt = exp.checkpointer
  start = ckpt.latest_step()
  # The data position resumes exactly when the process count is unchanged (each process owns a data shard).
  # Otherwise the shards differ; the stream restarts with a seed that depends on the step.
  exact_data = start is None or ckpt.restore_meta(start).get("process_count", 1) == jax.process_count()
  data_seed = config.seed if exact_data else config.seed + start
  data_iter = iter(make_train_stream(config, exp.tokenizer, data_seed))

  if start is None:
    state = initial_state(exp)
    start = 0
  else:
    abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    try:
      state, _ = ckpt.restore(start, abstract, data_iter if exact_data else None)
    except (ValueError, KeyError) as err:
      raise ConfigError(f"the checkpoint in {ckpt.directory} does not match this config ({err}); "
                        "use a new --workdir for a different model") from err
    print(f"Resumed from the checkpoint at step {start} in {ckpt.directory}", flush=True)
    if not exact_data:
      print("Warning: the checkpoint was written by a different number of processes; the input stream "
            f"restarts with data seed {data_seed} (parameters and optimizer state resume exactly)", flush=True)

  batch_sharding = mesh_lib.batch_sharding(exp.mesh)  # every batch leaf: leading dim over data x fsdp
  teacher = None
  if config.get("teacher") and config.teacher.workdir:
    teacher = teacher_lib.load_teacher(config.teacher, exp.mesh, exp.tokenizer)
    print(f"Teacher: {config.teacher.workdir} (step {teacher.step})", flush=True)
  step_fn = step_lib.make_train_step(
      exp.model, exp.loss_spec.build(config.loss, exp.mesh),
      lambda p: exp.loss_spec.clamp_params(config.loss, p), exp.tx,
      optimizer_lib.learning_rate_schedule(cfg), teacher)
  compiled_steps: dict = {}

  def train_step(state, batch, teacher_params, task):
    """One jitted step per task type (the hybrid loss picks its branch from the static task)."""
    if task not in compiled_steps:
      compiled_steps[task] = jax.jit(
          functools.partial(step_fn, task=task),
          in_shardings=(exp.state_shardings, batch_sharding,
                        jax.tree.map(lambda x: x.sharding, teacher.params) if teacher else None),
          out_shardings=(exp.state_shardings, mesh_lib.replicated(exp.mesh)),
          donate_argnums=(0,))
    return compiled_steps[task](state, batch, teacher_params)
  teacher_params = teacher.params if teacher else None
  evaluators = build_evaluators(exp)
  writer = metrics_lib.MetricWriter(exp.workdir)
  stop = _StopSignal()

  def assemble(local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}

  def check_finite(step: int, metrics: dict):
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      last = ckpt.latest_step()
      raise TrainingError(
          f"the loss became {loss} at step {step}; lower config.train.learning_rate (now {cfg.learning_rate}) "
          f"or config.train.grad_clip_norm; the last good checkpoint (step {last}) in {ckpt.directory} is kept")

  results: dict = {}
  step = start
  pbar = tqdm.tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=jax.process_index() != 0)
  t_last, samples = time.perf_counter(), 0
  try:
    while step < cfg.steps:
      task, local = _split_task(config, next(data_iter))
      samples += next(iter(local.values())).shape[0] * jax.process_count()
      state, metrics = train_step(state, assemble(local), teacher_params, task)
      step += 1
      pbar.update(1)
      is_last = step == cfg.steps
      stopping = stop.requested(step)
      save_now = step % cfg.checkpoint_every == 0 or is_last or stopping
      if step % cfg.log_every == 0 or save_now:
        metrics = jax.device_get(metrics)
        check_finite(step, metrics)
        now = time.perf_counter()
        rate = samples / max(now - t_last, 1e-9)
        t_last, samples = now, 0
        writer.write(step, {**{f"train/{k}": v for k, v in metrics.items()}, "train/samples_per_sec": rate})
        pbar.set_postfix(loss=f"{float(metrics['loss']):.4f}", samples_per_s=f"{rate:.0f}")
      if step % cfg.eval_every == 0 or is_last:
        results = evaluate.run_evaluators(evaluators, state.params["model"])
        writer.write(step, metrics_lib.flatten(results, "eval"))
        _write_results(exp, step, results)
        t_last, samples = time.perf_counter(), 0
      if save_now:
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


def _split_task(config: ml_collections.ConfigDict, item) -> tuple[str | None, dict]:
  """A text stream yields (task name, batch) -> (task type, batch); the image-text stream yields batches."""
  if isinstance(item, tuple):
    name, batch = item
    return str(config.data.tasks[name].type), batch
  return None, item


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode eval`: evaluates the newest checkpoint in `workdir` and writes eval_results.json.

  With no checkpoint, a model with a pretrained checkpoint is evaluated as loaded (step 0).
  """
  exp = build_experiment(config, workdir)
  step = exp.checkpointer.latest_step()
  if step is None and models.pretrained_source(config.model):
    print(f"No checkpoint in {exp.checkpointer.directory}: evaluating the pretrained model "
          f"{models.pretrained_source(config.model)!r} as loaded", flush=True)
    state, step = initial_state(exp), 0
  elif step is None:
    raise ConfigError(f"no checkpoint in {exp.checkpointer.directory}; train first with --mode train")
  else:
    abstract = ckpt_lib.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    state, _ = exp.checkpointer.restore(step, abstract)
  results = evaluate.run_evaluators(build_evaluators(exp), state.params["model"])
  path = _write_results(exp, step, results)
  exp.checkpointer.close()
  print(f"\nResults at step {step}:\n{format_results(results)}\nWritten to {path}", flush=True)
  return results
