"""Image→text InfoNCE with multiple positives: every caption with the row's id (its Fashion-MNIST class, or the
same emoji) is a positive; the rest of the global batch are negatives.

    python -m big_embed.main --config configs/infonce_multipositive.py --workdir runs/infonce_multipositive
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("infonce", query_tower="image", key_tower="text", duplicates="positive",
                   multi_positive="mean", temperature=0.05)
  return c
