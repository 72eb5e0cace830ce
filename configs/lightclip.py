"""LightCLIP-style progressive softening of the negative labels (instance-level term only; §8, unverified).

ε ramps linearly from 0 to epsilon_max over the whole run.

    python -m big_embed.main --config configs/lightclip.py --workdir runs/lightclip
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("lightclip", towers=("image", "text"), soft_neg_mode="uniform", epsilon_max=0.1,
                   schedule="linear", ramp_steps=c.train.steps)
  return c
