"""Models by kind: `config.model.type` is "two_tower" (image-text CLIP, the default) or "text" (one shared BERT tower).

    kind = models.kind_of(config.model)               # a `ModelKind`
    model = kind.build(config.model, tokenizer.vocab_size)
    params = model.init(rng, kind.example_batch(config.model))["params"]
    emb = model.apply({"params": params}, batch)       # {"image": [B, D], "text": [B, D]} or {"query": ..., ...}
    emb = model.apply({"params": params}, chunk, row_ids=ids, rngs={"dropout": key})  # training: row-keyed dropout

A kind also says where its pretrained weights and tokenizer come from (`pretrained_source`, `pretrained_params`,
`tokenizer_source`) and which embeddings it returns (`outputs`). A new kind is a module with a `KIND` listed here.
"""

from __future__ import annotations

import ml_collections

from big_embed.errors import ConfigError
from big_embed.models import text_embedder
from big_embed.models import two_tower
from big_embed.models.kind import ModelKind

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (two_tower.KIND, text_embedder.KIND)}


def kind_of(model_config: ml_collections.ConfigDict) -> ModelKind:
  """The kind of `config.model` (its `type`, default "two_tower").

  Raises:
    ConfigError: an unknown type.
  """
  name = model_config.get("type", "two_tower")
  if name not in KINDS:
    raise ConfigError(f"config.model.type={name!r} is unknown; use one of {tuple(KINDS)}")
  return KINDS[name]


def resolve(model_config: ml_collections.ConfigDict, announce: bool = False) -> ml_collections.ConfigDict:
  """`config.model` with the fields left to a pretrained checkpoint filled from it (`ModelKind.resolve`); with
  `announce`, prints what the checkpoint's files gave it."""
  kind = kind_of(model_config)
  if announce:
    kind.announce(model_config)
  return kind.resolve(model_config)
