"""Helpers for recipe files (`configs/<recipe>.py`): light, they import only `ml_collections` and the schema.

    from big_embed import config_utils as cu

    def get_config(arg=None):
      args = cu.parse_arg(arg, tiny=False)          # "tiny" -> args.tiny = True
      c = cu.base_config("two_tower")               # every train / model / data field at its default
      c.loss = cu.loss("clip", temperature=0.05)    # the loss's defaults fill the other fields at start
      c.data.tasks.defs = cu.text_task(type="retrieval", dataset="wordnet",
                                       fields={"query": "definition", "doc": "lemmas"})
      return c

Loading a recipe never imports JAX, Grain or TFDS, so a typo on the command line is reported at once.
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Any

import ml_collections

from big_embed import config_schema
from big_embed.config_schema import base_config  # noqa: F401  (the recipes' starting point)
from big_embed.errors import ConfigError


def load_recipe(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the recipe file at `path` (e.g. a sibling: `Path(__file__).with_name(...)`).

  A recipe is input: whatever goes wrong in it is reported as the recipe's fault.

  Raises:
    ConfigError: one line naming the recipe (`--config PATH[:ARG]`): the file is missing or not a file, does not
      load (a syntax error, a failing import, ...), has no `get_config`, `get_config` raises (a rejected `arg`) or
      returns something other than a ConfigDict.
  """
  path = pathlib.Path(path)
  where = f"--config {path}" + (f":{arg}" if arg is not None else "")
  if not path.is_file():
    raise ConfigError(f"{where}: {'is not a file' if path.exists() else 'no such recipe file'}; pass a recipe, "
                      "e.g. --config configs/quickstart.py")
  spec = importlib.util.spec_from_file_location(f"big_embed_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as err:
    raise ConfigError(f"{where}: syntax error at line {err.lineno}: {err.msg}") from None
  except Exception as err:  # pylint: disable=broad-except  (the recipe's own code failed while loading)
    raise ConfigError(f"{where}: the recipe failed to load: {_one_line(err)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"{where}: the recipe defines no get_config(arg=None)")
  try:
    config = get_config(arg)
  except ConfigError as err:  # e.g. a rejected recipe argument (`parse_arg`)
    raise ConfigError(f"{where}: {err}") from None
  except Exception as err:  # pylint: disable=broad-except  (the recipe's own code failed)
    raise ConfigError(f"{where}: get_config raised {_one_line(err)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{where}: get_config returned {config!r:.80}, not an ml_collections.ConfigDict (start from "
                      "config_utils.base_config(kind))")
  return config


def _one_line(err: BaseException) -> str:
  return " ".join(f"{type(err).__name__}: {err}".split())


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """A recipe argument "name,key=value,..." as a ConfigDict of `spec`'s keys (big_vision's `parse_arg`).

  `spec` gives every allowed key with its default; a bare name sets a bool key to True, `key=value` is parsed as
  the default's type. E.g. `parse_arg("tiny", tiny=False, steps=0)` -> {tiny: True, steps: 0}.

  Raises:
    ConfigError: an unknown key, a bare name for a non-bool key, or a value of the wrong type.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, has_value, value = part.partition("=")
    if key not in spec:
      known = ", ".join(sorted(spec)) or "none"
      raise ConfigError(f"recipe argument {arg!r}: unknown {key!r}; this recipe takes: {known}")
    default = spec[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(f"recipe argument {arg!r}: {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      else:
        out[key] = type(default)(value)
    except ValueError:
      raise ConfigError(f"recipe argument {arg!r}: {key}={value!r} is not a {type(default).__name__}") from None
  return out


def loss(name: str, **fields: Any) -> ml_collections.ConfigDict:
  """`config.loss` for loss `name`: the fields a recipe sets; the loss's defaults fill the rest when the run
  starts (`big_embed.losses.resolve`), where unknown fields are rejected. A wrapper's `inner` is another `loss()`."""
  return ml_collections.ConfigDict({"name": name, **fields})


def text_task(**overrides: Any) -> ml_collections.ConfigDict:
  """One task of `config.data.tasks`: `config_schema.TEXT_TASK`'s defaults with `overrides` (`fields` is merged
  role by role).

  Raises:
    ConfigError: an override names no task field, or `fields` names an unknown role.
  """
  task = config_schema.text_task_defaults()
  unknown = sorted(set(overrides) - set(task))
  if unknown:
    raise ConfigError(f"text task has no field(s) {unknown}; known: {sorted(task)}")
  fields = dict(overrides.pop("fields", None) or {})
  bad_roles = sorted(set(fields) - set(config_schema.TASK_ROLES))
  if bad_roles:
    raise ConfigError(f"text task fields has no role(s) {bad_roles}; known: {list(config_schema.TASK_ROLES)}")
  task.update(overrides)
  task.fields.update(fields)
  return task


def make_tiny_text(c: ml_collections.ConfigDict, steps: int = 4) -> None:
  """Shrinks a text recipe for tests: a random-init 1-layer BERT (the pretrained model's tokenizer, so MiniLM's
  must be installed), 16-token texts, batch 16, `steps` steps and small evaluation batches."""
  c.model.pretrained = ""
  c.model.num_layers = 1
  c.model.bert.update(dict(hidden_size=32, num_heads=2, intermediate_size=64))
  c.model.max_text_len = 16
  c.train.update(dict(batch_size=16, steps=steps, warmup_steps=1, log_every=2, eval_every=steps,
                      checkpoint_every=2))
  c.eval_batch_size = 64
