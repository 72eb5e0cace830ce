"""The assembly of a run: everything derived from (config, workdir) before a step runs.

`build_experiment` checks the whole config first (the schema, the mesh, the loss and its fields, the text tasks
and the task types the loss trains on) and only then builds: mesh -> tokenizer -> model -> loss -> optimizer ->
abstract sharded state -> checkpointer. `initial_state`, `make_train_stream`, `make_train_step` and
`build_evaluators` turn an `Experiment` into what the loop (train/loop.py) runs.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from big_embed import checkpoint as ckpt_lib
from big_embed import config_schema
from big_embed import evaluate
from big_embed import losses
from big_embed import models
from big_embed import run as run_lib
from big_embed.data import paths as data_paths
from big_embed.data import pipeline
from big_embed.data import text_stream
from big_embed.data import text_tasks
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.models import pretrained
from big_embed.models.kind import ModelKind
from big_embed.parallel import mesh as mesh_lib
from big_embed.parallel import sharding as sharding_lib
from big_embed.train import compiled_step
from big_embed.train import grad_cache
from big_embed.train import optimizer as optimizer_lib
from big_embed.train import state as state_lib
from big_embed.train import step as step_lib


@dataclasses.dataclass
class Experiment:
  """Everything derived from (config, workdir) before any step runs."""

  config: ml_collections.ConfigDict  # checked, with `loss` resolved (every field of the loss filled in)
  workdir: pathlib.Path
  data_dir: pathlib.Path
  mesh: Any
  tasks: dict  # text task name -> TaskSpec ({} for image-text runs)
  tokenizer: Tokenizer
  kind: ModelKind
  model: Any
  loss_spec: losses.LossSpec
  tx: Any
  init_fn: Any
  abstract_state: Any
  state_shardings: Any
  checkpointer: ckpt_lib.Checkpointer


def prepare_workdir(workdir: str | os.PathLike[str] | None) -> pathlib.Path:
  """The absolute run directory `workdir`, created if missing and checked to be writable.

  Raises:
    ConfigError: `workdir` is empty, names an existing non-directory, or cannot be written.
  """
  if workdir is None or not str(workdir).strip():
    raise ConfigError(f"--workdir={'' if workdir is None else str(workdir)!r} is empty; pass the run's directory, "
                      "e.g. --workdir=runs/quickstart")
  path = pathlib.Path(workdir).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {path} exists and is not a directory; pass a directory (new or a run's)")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe_{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as err:
    raise ConfigError(f"--workdir {path} is not writable ({err.strerror or err}); "
                      "pass a directory you can write to") from err
  return path


def _check_train(t: ml_collections.ConfigDict, mesh) -> None:
  shards = mesh_lib.batch_size_per_shard(mesh)
  if t.batch_size <= 0 or t.batch_size % shards:
    raise ConfigError(
        f"config.train.batch_size={t.batch_size} is not divisible by the {shards} data-parallel shards of the "
        f"mesh {dict(mesh.shape)}; use a multiple of {shards}")
  if t.batch_size % jax.process_count():
    raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by the "
                      f"{jax.process_count()} processes")
  # Each field's type and range: config_schema.TRAIN (checked by `config_schema.validate`).


def check_task_types(config: ml_collections.ConfigDict) -> None:
  """Text tasks need a text model and a loss that trains on their types; image-text data a two-tower model.

  `config.loss` is resolved; the task types are the schema-checked `config.data.tasks.<name>.type`.
  """
  tasks = {name: task.type for name, task in (config.data.get("tasks") or {}).items()}
  kind = config.model.get("type", "two_tower")
  if tasks and kind != "text":
    raise ConfigError(f"config.data.tasks are text tasks, but config.model.type={kind!r}; use a text model "
                      "(config.model.type='text') or config.data.mixture for image-text data")
  if dict(config.data.get("mixture") or {}) and kind == "text":
    raise ConfigError("config.data.mixture is image-text data, but config.model.type='text'; train a text model "
                      "on config.data.tasks")
  allowed = losses.task_types(config.loss)
  bad = {name: task_type for name, task_type in tasks.items() if task_type not in allowed}
  if bad:
    fit = [n for n in losses.names() if set(tasks.values()) <= set(losses.get(n).task_types or ())]
    pick = f"one of {', '.join(fit)}" if fit else "no single loss trains on all of them"
    raise ConfigError(f"loss {config.loss.name!r} trains only on {'/'.join(allowed)} tasks, but config.data.tasks "
                      f"has {', '.join(f'{n} ({t})' for n, t in bad.items())}; remove them or pick a loss for "
                      f"them ({pick})")


def check_config(config: ml_collections.ConfigDict, mesh) -> tuple[ml_collections.ConfigDict, dict]:
  """Every check of the config before anything is built or compiled (of the data, only the prepared datasets'
  features are read); returns (the config with `loss` and `model` resolved, the text tasks).

  Raises:
    ConfigError (or another UserError): the first problem, in one line naming the field and the fix.
  """
  config_schema.validate(config)
  resolved = config.copy_and_resolve_references()
  resolved.unlock()
  resolved.loss = losses.resolve(config.loss)
  resolved.model = models.resolve(config.model, announce=jax.process_index() == 0)
  resolved.lock()
  evaluate.registry.check_settings(resolved.evals)
  _check_train(resolved.train, mesh)
  sharding_lib.check_rules(resolved.sharding_rules, mesh)
  check_task_types(resolved)
  tasks = {}
  if resolved.data.get("tasks"):
    tasks = text_tasks.validate_tasks(resolved.data, resolved.train.batch_size,
                                      mesh_lib.batch_size_per_shard(mesh), jax.process_count())
  return resolved, tasks


def build_experiment(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> Experiment:
  workdir_path = prepare_workdir(workdir)
  config_schema.validate(config)  # before the mesh is made of config.mesh
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  config, tasks = check_config(config, mesh)
  data_dir = data_paths.resolve_data_dir(config.data.data_dir or None)
  tokenizer = run_lib.run_tokenizer(workdir_path, config.model, data_dir)
  kind = models.kind_of(config.model)
  model = kind.build(config.model, tokenizer.vocab_size)
  loss_spec = losses.get(config.loss.name)
  tx = optimizer_lib.make_optimizer(config.train)
  init_fn = state_lib.make_init_fn(model, kind.example_batch(config.model),
                                   lambda: loss_spec.init_params(config.loss), tx, config.seed)
  abstract, shardings = state_lib.state_shardings(init_fn, mesh, config.sharding_rules)
  checkpointer = ckpt_lib.Checkpointer(run_lib.checkpoint_dir(workdir_path),
                                       max_to_keep=config.train.keep_checkpoints)
  return Experiment(config, workdir_path, data_dir, mesh, tasks, tokenizer, kind, model, loss_spec, tx, init_fn,
                    abstract, shardings, checkpointer)


def initial_state(exp: Experiment):
  """A fresh sharded state; a model with a pretrained checkpoint (`ModelKind.pretrained_source`) starts from
  those weights."""
  state = state_lib.create_sharded_state(exp.init_fn, exp.state_shardings)
  m = exp.config.model
  if not exp.kind.pretrained_source(m):
    return state
  shardings = exp.state_shardings.params["model"]
  init = jax.device_get(state.params["model"])  # numpy; merged leaves are then placed shard by shard
  merged = pretrained.merge_pretrained(init, exp.kind.pretrained_params(m))
  params = jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx]), merged, shardings)
  return state.replace(params={**state.params, "model": params})


def make_train_stream(exp: Experiment, seed: int):
  """The process-local training stream: (task type, batch) of the text tasks, or image-text batches."""
  c, m = exp.config, exp.config.model
  where = dict(seed=seed, process_index=jax.process_index(), process_count=jax.process_count())
  if exp.tasks:
    return text_stream.make_text_train_dataset(
        exp.tasks, c.data, exp.tokenizer, max_text_len=m.max_text_len, query_prefix=m.get("query_prefix", ""),
        doc_prefix=m.get("doc_prefix", ""), **where)
  return pipeline.make_train_dataset(c.data, exp.tokenizer, batch_size=c.train.batch_size,
                                     max_text_len=m.max_text_len, image_size=m.image_size, **where)


def make_train_step(exp: Experiment, teacher=None, on_compile: Callable | None = None) -> compiled_step.TrainStep:
  """`step(state, batch, teacher_params, task) -> (state, metrics)`, compiled ahead of time once per task type
  (static) and batch shape (`compiled_step.TrainStep`), with the state donated and sharded as
  `exp.state_shardings`, the batch over the mesh's batch axes; `on_compile(step_cost.StepCost)` is called for each
  new executable."""
  c = exp.config
  lr_schedule = optimizer_lib.learning_rate_schedule(c.train)
  teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher.params) if teacher else None
  chunking = None
  if c.train.embed_chunk_size:
    chunking = grad_cache.Chunking(exp.mesh, c.train.embed_chunk_size, exp.kind.outputs)

  def step_fn(task):
    return step_lib.make_train_step(exp.model, exp.loss_spec.build(c.loss, exp.mesh, task),
                                    lambda p: exp.loss_spec.clamp_params(c.loss, p), exp.tx, lr_schedule, teacher,
                                    chunking)

  return compiled_step.TrainStep(
      step_fn, mesh=exp.mesh, abstract_state=exp.abstract_state, state_shardings=exp.state_shardings,
      in_shardings=(exp.state_shardings, mesh_lib.batch_sharding(exp.mesh), teacher_shardings),
      out_shardings=(exp.state_shardings, mesh_lib.replicated(exp.mesh)),
      abstract_teacher_params=(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), teacher.params)
                               if teacher else None),
      on_compile=on_compile)


def build_evaluators(exp: Experiment) -> dict[str, Any]:
  m = exp.config.model
  encoder = evaluate.encode.Encoder(exp.model, exp.mesh, exp.config.eval_batch_size)
  ctx = evaluate.EvalContext(
      encoder=encoder, tokenizer=exp.tokenizer, data_dir=str(exp.data_dir), image_size=m.get("image_size", 0),
      max_text_len=m.max_text_len,
      encode_texts=evaluate.encode.TextEncoding(encoder, exp.tokenizer, m.max_text_len,
                                                m.get("query_prefix", ""), m.get("doc_prefix", "")))
  return evaluate.build_evaluators(exp.config.evals, ctx)
