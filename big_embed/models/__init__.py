"""Models by `config.model.type`: "two_tower" (image-text CLIP, the default) or "text" (a shared BERT tower).

`build_model(model_config, vocab_size)` and `example_batch(model_config)` are all the train loop, the teacher and
the evaluators need; both model kinds have `encode_text(tokens [B, L]) -> [B, D]` (unit norm) and
`__call__(batch) -> {tower or input name: embeddings}`.
"""

from __future__ import annotations

import ml_collections

MODEL_TYPES = ("two_tower", "text")


def model_type(model_config: ml_collections.ConfigDict) -> str:
  kind = model_config.get("type", "two_tower")
  if kind not in MODEL_TYPES:
    raise ValueError(f"config.model.type={kind!r} is unknown; use one of {MODEL_TYPES}")
  return kind


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int):
  if model_type(model_config) == "text":
    from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
    return text_embedder.build_text_model(model_config, vocab_size)
  from big_embed.models import two_tower  # pylint: disable=g-import-not-at-top
  return two_tower.build_model(model_config, vocab_size)


def example_batch(model_config: ml_collections.ConfigDict) -> dict:
  """A one-row batch with the model's input shapes (for init and eval_shape)."""
  if model_type(model_config) == "text":
    from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
    return text_embedder.example_batch(model_config.max_text_len)
  from big_embed.models import two_tower  # pylint: disable=g-import-not-at-top
  return two_tower.example_batch(model_config.image_size, model_config.max_text_len)


def pretrained_source(model_config: ml_collections.ConfigDict) -> str:
  """The pretrained checkpoint a model starts from ("" = none): a text model's `pretrained`, or a two-tower
  model's `text_pretrained` (its text side)."""
  if model_type(model_config) == "text":
    return model_config.get("pretrained", "")
  return model_config.get("text_pretrained", "")


def pretrained_params(model_config: ml_collections.ConfigDict) -> dict | None:
  """The checkpoint's part of the model's params (float32 NumPy, at the level of the "params" collection), for
  `text_embedder.merge_pretrained` into freshly initialised params; None without a pretrained checkpoint."""
  if not pretrained_source(model_config):
    return None
  from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
  if model_type(model_config) == "text":
    return text_embedder.pretrained_model_params(model_config)
  from big_embed.models import two_tower  # pylint: disable=g-import-not-at-top
  return {"text_tower": text_embedder.pretrained_model_params(two_tower.pretrained_text_config(model_config))}
