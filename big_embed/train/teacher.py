"""A frozen teacher: the model of another run (`run.restore_run`) or a pretrained text model
(`run.restore_pretrained`), applied inside the train step.

`config.teacher = {workdir: "runs/teacher", outputs: {"image": "teacher_image", "text": "teacher_text"}}` adds
the teacher's embeddings of each batch to the batch under those keys (stop-gradient), where distillation and
soft-label losses read them. The teacher's architecture comes from the config saved with its checkpoint (or, with
`pretrained: "minilm"`, from the checkpoint's own files, all of its layers); it must share the student's tokenizer
(train both on the same prepared data, or start the student from the same pretrained model). A teacher too big to
run every step can instead be embedded once into the data (`python -m big_embed.embed_teacher`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from big_embed import models
from big_embed import run as run_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.train import grad_cache


@dataclasses.dataclass
class Teacher:
  model: Any
  params: Any  # restored, sharded by the teacher's own rules on the student's mesh
  outputs: dict[str, str]  # teacher output -> batch key
  step: int
  inputs: tuple[str, ...] = ()  # the batch entries the teacher's model embeds (its kind's outputs)

  def annotate(self, params, batch: dict, chunking: grad_cache.Chunking | None = None) -> dict:
    """batch + {batch key: stop_gradient(teacher embedding)}; inside the jitted step. With a `chunking` the
    teacher embeds the batch chunk by chunk (the student's gradient-caching chunks)."""
    if chunking is None:
      emb = self.model.apply({"params": params}, batch)
    else:
      chunking = dataclasses.replace(chunking, inputs=self.inputs)
      emb = grad_cache.embed_in_chunks(lambda x, _: self.model.apply({"params": params}, x), batch, chunking)
    return {**batch, **{key: jax.lax.stop_gradient(emb[out]) for out, key in self.outputs.items()}}


def is_configured(teacher_config: ml_collections.ConfigDict) -> bool:
  """Whether `config.teacher` names a teacher (a workdir or a pretrained model)."""
  return bool(teacher_config.workdir or teacher_config.get("pretrained", ""))


def load_teacher(teacher_config: ml_collections.ConfigDict, mesh, tokenizer: Tokenizer) -> Teacher:
  """Restores the newest checkpoint of `teacher_config.workdir`, or the pretrained model
  `teacher_config.pretrained`, onto `mesh`.

  Raises:
    ConfigError: both or neither source is set, the workdir holds no complete run, the pretrained model is missing,
      its tokenizer is not the student's, or `outputs` names an embedding the teacher's model kind does not return.
  """
  workdir, name = teacher_config.workdir, teacher_config.get("pretrained", "")
  if bool(workdir) == bool(name):
    raise ConfigError(f"config.teacher: give one of workdir ({workdir!r}) and pretrained ({name!r}), not "
                      f"{'both' if workdir else 'neither'}")
  field = "workdir" if workdir else "pretrained"
  try:
    teacher = run_lib.restore_run(workdir, mesh) if workdir else run_lib.restore_pretrained(name, mesh)
  except ConfigError as err:
    raise ConfigError(f"config.teacher.{field}: {err}") from err
  if teacher.tokenizer != tokenizer:
    raise ConfigError(f"the teacher in {teacher.workdir} was trained with a different tokenizer; give teacher and "
                      "student the same one: the same prepared data (config.data.data_dir), or the same pretrained "
                      "text model")
  outputs = models.kind_of(teacher.config.model).outputs
  unknown = sorted(set(teacher_config.outputs) - set(outputs))
  if unknown:
    raise ConfigError(f"config.teacher.outputs names {unknown}, which the teacher's model does not return; "
                      f"use some of {list(outputs)}")
  return Teacher(model=teacher.model, params=teacher.params, outputs=dict(teacher_config.outputs),
                 step=teacher.step, inputs=tuple(outputs))
