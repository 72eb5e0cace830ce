"""SigLIP (Zhai et al. 2023): pairwise sigmoid loss with learnable scale and bias, on the quickstart data.

    python -m big_embed.main --config configs/siglip.py --workdir runs/siglip
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("siglip", towers=("image", "text"), temperature=0.1, bias_init=-10.0)  # κ = 10 at init
  return c
