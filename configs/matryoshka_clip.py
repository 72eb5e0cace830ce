"""Matryoshka CLIP (Kusupati et al. 2022): the CLIP loss averaged over nested, re-normalised prefixes.

    python -m big_embed.main --config configs/matryoshka_clip.py --workdir runs/matryoshka_clip
"""

import pathlib

from big_embed import config_utils
from big_embed import losses


def get_config(arg=None):
  c = config_utils.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  e = c.model.embed_dim
  c.loss = losses.loss_config("matryoshka", inner=losses.loss_config("clip"), reduction="mean",
                              dims=tuple(d for d in (e // 8, e // 4, e // 2, e) if d > 0))
  return c
