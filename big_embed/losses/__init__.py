"""Contrastive and distillation losses, selectable by `config.loss.name` (see `registry`).

The contrastive losses are thin functions over the tiled similarity engine (`engine`).
"""

from big_embed.losses import clip  # noqa: F401  (registers "clip")
from big_embed.losses import siglip  # noqa: F401  (registers "siglip")
from big_embed.losses import softclip  # noqa: F401  (registers "softclip")
from big_embed.losses import lightclip  # noqa: F401  (registers "lightclip")
from big_embed.losses import infonce  # noqa: F401  (registers "infonce")
from big_embed.losses import peg  # noqa: F401  (registers "peg")
from big_embed.losses import teacher_kl  # noqa: F401  (registers "teacher_kl")
from big_embed.losses import dexml  # noqa: F401  (registers "dexml")
from big_embed.losses import pairwise  # noqa: F401  (registers "cosent")
from big_embed.losses import distill  # noqa: F401  (registers "disco_mse", "logit_kd", "sinkd", "repcon_kd")
from big_embed.losses import matryoshka  # noqa: F401  (registers "matryoshka")
from big_embed.losses import hybrid  # noqa: F401  (registers "hybrid")
from big_embed.losses import similarity_kd  # noqa: F401  (registers "similarity_kd")
from big_embed.losses.registry import LossSpec, get, loss_config, names  # noqa: F401
