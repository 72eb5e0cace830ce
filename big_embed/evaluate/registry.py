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
from big_embed.evaluate.encode import Encoder


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
  return {name: {k: float(v) for k, v in ev.run(params).items()} for name, ev in evaluators.items()}
