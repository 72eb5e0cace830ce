"""Registry of evaluators, configured in `config.evals` and run periodically or with `--mode eval`.

`config.evals` maps an evaluator's result name to its settings, e.g.
    evals.fashion_mnist = dict(type="zero_shot", dataset="fashion_mnist", split="test")
Each type is a class constructed as `cls(settings, context)` with a `run(params) -> {metric: float}` method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from big_embed.errors import ConfigError
from big_embed.evaluate.encode import Encoder, NonFiniteEmbeddings


@dataclasses.dataclass
class EvalContext:
  """What every evaluator may use."""

  encoder: Encoder
  tokenizer: Any  # big_embed.data.tokenizer.Tokenizer
  data_dir: str
  image_size: int  # 0 for text-only models
  max_text_len: int
  # (params, texts: list[str], role: "query" | "doc", desc=None) -> float32 [N, D]: prefixes, tokenization,
  # length-bucketed batches (big_embed.evaluate.encode.TextEncoding).
  encode_texts: Callable[..., Any] | None = None


_TYPES: dict[str, Callable[..., Any]] = {}


def register(name: str):
  def wrap(cls):
    _TYPES[name] = cls
    return cls
  return wrap


# The settings each image evaluator reads (`type` aside); a text evaluator checks its own (text_evals._Settings).
IMAGE_SETTINGS = {"retrieval": ("dataset", "split"), "zero_shot": ("dataset", "split", "templates")}


def check_settings(evals: ml_collections.ConfigDict) -> None:
  """Checks what needs no data, before anything compiles: every evaluator's type is registered, and an image
  evaluator's settings are those it reads (an ignored key is an error), with `dataset` and `split` names.

  Raises:
    ConfigError: one line naming `config.evals.<name>.<setting>`.
  """
  for name, settings in evals.items():
    kind = settings.get("type")
    if kind not in _TYPES:
      raise ConfigError(f"config.evals.{name}.type={kind!r} is unknown; known types: {sorted(_TYPES)}")
    if kind not in IMAGE_SETTINGS:
      continue
    known = IMAGE_SETTINGS[kind]
    for key in settings.keys():
      if key != "type" and key not in known:
        raise ConfigError(f"config.evals.{name}.{key} is not a setting of a {kind} evaluator (it reads only "
                          f"{', '.join(known)}); remove it")
    for key in ("dataset", "split"):
      value = settings.get(key)
      if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ConfigError(f"config.evals.{name}.{key}={value!r} must name a prepared dataset's {key} (a {kind} "
                          f"evaluator reads it), e.g. dataset='emoji', split='test'")


def build_evaluators(evals: ml_collections.ConfigDict, context: EvalContext) -> dict[str, Any]:
  """Constructs every evaluator of `config.evals` (each reads its data now).

  Raises:
    ConfigError: an unknown type or a bad setting (the evaluator's ValueError, prefixed with its config path).
  """
  out = {}
  for name, settings in evals.items():
    kind = settings.get("type")
    if kind not in _TYPES:
      raise ConfigError(f"config.evals.{name}.type={kind!r} is unknown; known types: {sorted(_TYPES)}")
    try:
      out[name] = _TYPES[kind](settings, context)
    except ValueError as err:
      if isinstance(err, ConfigError):
        raise
      raise ConfigError(f"config.evals.{name}: {err}") from err
  return out


def run_evaluators(evaluators: dict[str, Any], params) -> dict[str, dict[str, float]]:
  """{evaluator name: {metric: float}} of `params`.

  Raises:
    NonFiniteEmbeddings: an evaluator's embeddings hold NaN or inf (named, with how many rows), not a result.
  """
  out = {}
  for name, ev in evaluators.items():
    try:
      out[name] = {k: float(v) for k, v in ev.run(params).items()}
    except NonFiniteEmbeddings as err:
      raise NonFiniteEmbeddings(f"evaluator config.evals.{name}: {err}") from err
  return out
