"""A frozen teacher: a two-tower model restored from another run's workdir, applied inside the train step.

`config.teacher = {workdir: "runs/teacher", outputs: {"image": "teacher_image", "text": "teacher_text"}}` adds
the teacher's embeddings of each batch to the batch under those keys (stop-gradient), where distillation and
soft-label losses read them. The teacher's architecture comes from the config saved with its checkpoint; it
must share the student's tokenizer (train both on the same prepared data).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections

from big_embed import checkpoint as ckpt_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed import models
from big_embed.models import text_embedder
from big_embed.train import state as state_lib


@dataclasses.dataclass
class Teacher:
  model: Any
  params: Any  # restored, sharded like the teacher's own state on the student's mesh
  outputs: dict[str, str]  # teacher tower -> batch key
  step: int

  def annotate(self, params, batch: dict) -> dict:
    """batch + {batch key: stop_gradient(teacher embedding)}; inside the jitted step."""
    emb = self.model.apply({"params": params}, batch)
    return {**batch, **{key: jax.lax.stop_gradient(emb[tower]) for tower, key in self.outputs.items()}}


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"workdir": "", "outputs": {"image": "teacher_image", "text": "teacher_text"}})


def load_teacher(cfg: ml_collections.ConfigDict, mesh, tokenizer: Tokenizer) -> Teacher:
  """Restores the newest checkpoint of `cfg.workdir` onto `mesh`."""
  workdir = pathlib.Path(cfg.workdir).expanduser().absolute()
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  step = checkpointer.latest_step()
  if step is None:
    raise ConfigError(f"config.teacher.workdir={workdir} has no checkpoint; train the teacher there first")
  teacher_tok = workdir / "tokenizer.json"
  if not teacher_tok.exists() or Tokenizer.from_file(str(teacher_tok)) != tokenizer:
    raise ConfigError(f"the teacher in {workdir} was trained with a different tokenizer; train teacher and "
                      "student on the same prepared data (config.data.data_dir)")
  tcfg = ml_collections.ConfigDict(checkpointer.restore_meta(step)["config"])
  model = models.build_model(tcfg.model, tokenizer.vocab_size)
  towers = {"image", "text"} if models.model_type(tcfg.model) == "two_tower" else set(text_embedder.TEXT_INPUTS)
  unknown = set(cfg.outputs) - towers
  if unknown:
    raise ConfigError(f"config.teacher.outputs names unknown teacher outputs {sorted(unknown)}; "
                      f"use some of {sorted(towers)}")
  abstract, shardings = state_lib.state_shardings(state_lib.init_fn_from_config(tcfg, model), mesh)
  state, _ = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
  checkpointer.close()
  return Teacher(model=model, params=state.params["model"], outputs=dict(cfg.outputs), step=step)

