"""`--mode compile`: the train step lowered and compiled for the config's mesh, without creating parameters.

The state is the experiment's abstract state with its shardings; the batch is abstract too. An image-text batch's
shapes follow from the config alone (`image_text_batch`), so nothing is read but the tokenizer (for the
vocabulary size). A text task's shapes depend on its records (the number of label texts, a multilabel task's most
labels per record), so each text task's first batch is built from its prepared data (`text_task_batches`): one
compile per distinct task type and batch shape. With `--cpu_devices N` the mesh is N fake CPU devices, so a pod
config's per-device memory can be checked on one machine.
"""

from __future__ import annotations

import jax
import ml_collections

from big_embed.data import reading
from big_embed.data import sources
from big_embed.data import text_batches
from big_embed.data import text_records
from big_embed.train import experiment as experiment_lib
from big_embed.train import step_cost
from big_embed.train import teacher as teacher_lib

TEXT_TASKS_READ_DATA = ("text tasks: each task's batch shapes come from its first batch, read from its prepared "
                        "data (label counts and multilabel widths depend on the records)")


def image_text_batch(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The global image-text batch `data.pipeline.make_train_dataset` yields, as ShapeDtypeStructs (B =
  config.train.batch_size, S = model.image_size, L = model.max_text_len)."""
  b, s, length = config.train.batch_size, config.model.image_size, config.model.max_text_len
  batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), "uint8"), "text": jax.ShapeDtypeStruct((b, length), "int32"),
           "ids": jax.ShapeDtypeStruct((b,), "int32")}
  if reading.setting(config.data, "mismatched_fraction") > 0:
    batch["score"] = jax.ShapeDtypeStruct((b,), "float32")
  return batch


def text_task_batches(exp: experiment_lib.Experiment) -> dict[str, tuple[str, dict[str, jax.ShapeDtypeStruct]]]:
  """Task name -> (task type, its global batch as ShapeDtypeStructs), from each task's first batch on this process
  (`text_batches`; reads the task's records)."""
  c, m = exp.config, exp.config.model
  data_dir = reading.data_dir(c.data)
  reader = text_records.ColumnReader(data_dir)
  out = {}
  for name, spec in exp.tasks.items():
    task = text_batches.open_task(spec, reader, sources.features(spec.dataset, data_dir), data_dir,
                                  tokenizer=exp.tokenizer, max_len=m.max_text_len,
                                  query_prefix=m.get("query_prefix", ""), doc_prefix=m.get("doc_prefix", ""),
                                  seed=c.seed, process_count=jax.process_count())
    local = task.batch(0, jax.process_index())
    out[name] = (spec.type, {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype)
                             for k, v in local.items()})
  return out


def compile_train_step(config: ml_collections.ConfigDict, workdir: str) -> list[step_cost.StepCost]:
  """Builds the experiment, compiles its train step for every distinct batch, prints each step's cost and writes
  `<workdir>/compile_report.json`; returns the costs. A teacher (config.teacher) is restored, as in
  training, for its parameters' shapes and shardings."""
  exp = experiment_lib.build_experiment(config, workdir)
  try:
    teacher = teacher_lib.load_teacher(exp.config.teacher, exp.mesh, exp.tokenizer) if (
        teacher_lib.is_configured(exp.config.teacher)) else None
    train_step = experiment_lib.make_train_step(exp, teacher)
    if exp.tasks:
      print(TEXT_TASKS_READ_DATA, flush=True)
      batches = list(text_task_batches(exp).values())
    else:
      batches = [(None, image_text_batch(exp.config))]
    for task, batch in batches:
      train_step.executable(batch, task)
  finally:
    exp.checkpointer.close()
  costs = train_step.costs
  if jax.process_index() == 0:
    for cost in costs:
      print(step_cost.format_cost(cost), flush=True)
    print(f"Compile report: {step_cost.write_report(exp.workdir, costs)}", flush=True)
  return costs
