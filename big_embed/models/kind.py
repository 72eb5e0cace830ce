"""What the rest of the code needs to know about one kind of model (`config.model.type`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import ml_collections

ModelConfig = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """One model kind. Every kind's module has `__call__(batch, row_ids=None) -> {output: float32 [N, D] unit
  vectors}` (one output per input entry of the batch, each row embedded independently of the others; `row_ids`
  int32 [N] the rows' global indices, which key the dropout masks, so chunks embed as the whole batch does) and
  `encode_text(tokens [B, L]) -> [B, D]` (a two-tower model also `encode_image(images) -> [B, D]`)."""

  name: str
  build: Callable[[ModelConfig, int], nn.Module]  # (config.model, vocab size) -> the flax module
  example_batch: Callable[[ModelConfig], dict]  # a one-row batch of the model's inputs (for init / eval_shape)
  outputs: tuple[str, ...]  # the emb keys `__call__(batch)` may return
  pretrained_source: Callable[[ModelConfig], str]  # the checkpoint the model starts from ("" = none)
  pretrained_params: Callable[[ModelConfig], Any]  # that checkpoint's part of the params (host NumPy tree)
  tokenizer_source: Callable[[ModelConfig], str]  # a pretrained tokenizer to use ("" = the prepared data's)
  # config.model with the fields left to a pretrained checkpoint filled from it (`run` saves this one)
  resolve: Callable[[ModelConfig], ModelConfig] = lambda c: c
  announce: Callable[[ModelConfig], None] = lambda c: None  # prints what the checkpoint gave the config
