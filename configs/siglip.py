"""SigLIP (Zhai et al. 2023): pairwise sigmoid loss with learnable scale and bias, on the quickstart data.

    python -m big_embed.main --config configs/siglip.py --workdir runs/siglip
"""

import pathlib

from big_embed import config_utils
from big_embed import losses


def get_config(arg=None):
  c = config_utils.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = losses.loss_config("siglip", towers=("image", "text"))  # t' = log 10, b = -10
  return c
