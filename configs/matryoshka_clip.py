"""Matryoshka CLIP (Kusupati et al. 2022): the CLIP loss averaged over nested, re-normalised prefixes.

    python -m big_embed.main --config configs/matryoshka_clip.py --workdir runs/matryoshka_clip
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  e = c.model.embed_dim
  c.loss = cu.loss("matryoshka", inner=cu.loss("clip"), reduction="mean",
                   dims=tuple(d for d in (e // 8, e // 4, e // 2, e) if d > 0))
  return c
