"""Contrastive and distillation losses, selectable by `config.loss.name` (see `registry`)."""

from big_embed.losses import clip  # noqa: F401  (registers "clip")
from big_embed.losses.registry import LossSpec, get, loss_config, names  # noqa: F401
