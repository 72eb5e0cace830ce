"""A run directory and the one way to restore a run's model: config, tokenizer and parameters.

    <workdir>/tokenizer.json         the run's tokenizer (written when the run first starts, kept for resume)
    <workdir>/checkpoints/<step>/    Orbax checkpoints: state, meta (the config, the process count), data iterator
    <workdir>/metrics.jsonl, eval_results.json, tensorboard/

`restore_run(workdir, mesh)` gives what inference needs (the frozen teacher of a distillation run, `encode`,
`mine`): the config saved with the newest checkpoint, the run's tokenizer, the model built from that config and
its parameters, restored onto `mesh` without the optimizer state. `restore_pretrained(name, mesh)` gives the same
for a pretrained text model ("minilm" or a BERT checkpoint directory), whole, as its files describe it. Training
resumes the whole state with the same `Checkpointer` (`train/loop.py`), and takes its tokenizer from
`run_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from big_embed import checkpoint as ckpt_lib
from big_embed import config_schema
from big_embed import models
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.models import pretrained
from big_embed.parallel import mesh as mesh_lib
from big_embed.parallel import sharding as sharding_lib

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike[str]) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().absolute() / CHECKPOINTS


def is_run(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a run directory (it has a checkpoints/ directory)."""
  return checkpoint_dir(path).is_dir()


def run_tokenizer(workdir: pathlib.Path, model_config: ml_collections.ConfigDict, data_dir) -> Tokenizer:
  """The run's own copy, so that a resumed run keeps its vocabulary; on the first start, the model kind's
  tokenizer (`ModelKind.tokenizer_source`: a pretrained one, or a dataset's of `data_dir` by its name, which
  `prepare files` trains for a text dataset) or else the one prepared with the image data, then saved.

  Raises:
    ConfigError: the source is no pretrained name, directory or dataset with a tokenizer.
  """
  own = workdir / TOKENIZER_FILE
  if own.exists():
    return Tokenizer.from_file(str(own))
  source = models.kind_of(model_config).tokenizer_source(model_config)
  dataset_tokenizer = (tokenizer_lib.dataset_tokenizer_path(data_dir, source)
                       if source.isidentifier() and source not in pretrained.NAMES else None)
  if dataset_tokenizer is not None and dataset_tokenizer.is_file():
    tok = Tokenizer.from_file(str(dataset_tokenizer))
  elif source:
    if dataset_tokenizer is not None and not pathlib.Path(source).is_dir():
      raise ConfigError(f"tokenizer {source!r} (config.model.tokenizer, else .pretrained) is no pretrained name "
                        f"{list(pretrained.NAMES)}, no directory, and no dataset of {data_dir} with a tokenizer (no "
                        f"{dataset_tokenizer}; `python -m big_embed.data.prepare files --name {source} ...` trains "
                        "one for a text dataset)")
    tok = pretrained.load_tokenizer(pretrained.resolve_pretrained(source))
  else:
    tok = tokenizer_lib.load_tokenizer(data_dir)
  if jax.process_index() == 0:  # atomically: other processes may be looking for it
    tmp = own.with_suffix(".tmp")
    tmp.write_text(tok.to_str(), encoding="utf-8")
    tmp.replace(own)
  return tok


def model_shardings(model: nn.Module, example_batch: dict, mesh, rules) -> tuple[Any, Any]:
  """(abstract unboxed model params, their NamedShardings) from the params' logical axis names."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), example_batch)["params"])
  return nn.unbox(boxed), sharding_lib.shardings_from_boxed(boxed, mesh, rules)


@dataclasses.dataclass
class Run:
  """A restored run: what its model needs to embed."""

  workdir: pathlib.Path
  step: int
  config: ml_collections.ConfigDict  # as saved with the checkpoint
  tokenizer: Tokenizer
  model: nn.Module
  params: Any  # the model's params, sharded over the mesh by the run's logical axis rules


def restore_run(workdir: str | os.PathLike[str], mesh, step: int | None = None) -> Run:
  """The newest intact (or the given `step`'s) checkpoint of the run in `workdir`, its model's params verified
  and restored onto `mesh`. A damaged newer checkpoint is reported in one warning line and skipped.

  Raises:
    ConfigError: no checkpoint, no tokenizer.json, or no such step.
    CheckpointError: checkpoint `step` is damaged, or (without `step`) none is intact.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  no_checkpoint = ConfigError(f"{workdir} holds no checkpoint; train a model there first (python -m "
                              f"big_embed.main --config ... --workdir {workdir})")
  if not is_run(workdir):
    raise no_checkpoint
  tok_path = workdir / TOKENIZER_FILE
  if not tok_path.is_file():
    raise ConfigError(f"{tok_path} is missing; it is written when a run starts, so {workdir} is not a complete "
                      "big_embed run")
  tokenizer = Tokenizer.from_file(str(tok_path))
  checkpointer = ckpt_lib.Checkpointer(checkpoint_dir(workdir), async_save=False, create=False)

  def restore(at: int) -> tuple[ml_collections.ConfigDict, nn.Module, Any]:
    config = ml_collections.ConfigDict(checkpointer.restore_meta(at)["config"])
    kind = models.kind_of(config.model)
    model = kind.build(config.model, tokenizer.vocab_size)
    rules = config.get("sharding_rules", config_schema.SHARDING_RULES)
    abstract, shardings = model_shardings(model, kind.example_batch(config.model), mesh, rules)
    params, _ = checkpointer.restore_params(at, ckpt_lib.abstract_with_shardings(abstract, shardings))
    return config, model, params

  try:
    if step is None:
      found = checkpointer.restore_newest_intact(restore, move_damaged=False)
      if found is None:
        raise no_checkpoint
      step, (config, model, params) = found
    else:
      step = int(step)
      if step not in checkpointer.step_dirs():
        raise ConfigError(f"{workdir} has no checkpoint at step {step}; its steps: {checkpointer.step_dirs()}")
      try:
        config, model, params = restore(step)
      except ckpt_lib.DamagedCheckpoint as err:
        raise ckpt_lib.CheckpointError(f"the checkpoint of step {step} in {checkpointer.directory} is damaged "
                                       f"({err.reason}); omit the step to read the newest intact checkpoint")
  finally:
    checkpointer.close()
  return Run(workdir=workdir, step=step, config=config, tokenizer=tokenizer, model=model, params=params)


def restore_pretrained(name_or_path: str | os.PathLike[str], mesh, **model_overrides) -> Run:
  """A pretrained text model ("minilm" or an HF-format BERT directory) as a `Run` at step 0: `config.model` is
  the text model's defaults with `pretrained` set (and `model_overrides`), resolved from the checkpoint's files
  (pooling, normalisation, max length and prompts; printed), its own tokenizer, its params replicated on `mesh`.

  Raises:
    PretrainedError: no such pretrained model, or its files are incomplete.
  """
  cfg = config_schema.model_defaults("text")
  cfg.pretrained = os.fspath(name_or_path)
  cfg.update(model_overrides)
  cfg = models.resolve(cfg, announce=True)
  kind = models.kind_of(cfg)
  path = pretrained.resolve_pretrained(cfg.pretrained)
  tokenizer = pretrained.load_tokenizer(path)
  model = kind.build(cfg, tokenizer.vocab_size)
  init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), kind.example_batch(cfg))["params"])()
  params = pretrained.merge_pretrained(jax.device_get(nn.unbox(init)), kind.pretrained_params(cfg))
  return Run(workdir=path, step=0, config=ml_collections.ConfigDict({"model": cfg}), tokenizer=tokenizer,
             model=model, params=jax.device_put(params, mesh_lib.replicated(mesh)))
