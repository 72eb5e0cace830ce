"""CoSENT (Su 2022; Piccolo2's STS loss, §3.3) on image-text matching pairs: half the captions of each batch are
swapped for another row's, with score 1 when the caption still shows the image and 0 otherwise; CoSENT ranks
the cosine of every matching pair above every non-matching one (λ = 20).

    python -m big_embed.main --config configs/cosent.py --workdir runs/cosent
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.data.mismatched_fraction = 0.5
  c.loss = cu.loss("cosent", towers=("image", "text"), score_key="score", temperature=0.05, weight=1.0)
  return c
