"""DEXML decoupled softmax (Gupta et al., ICLR 2024) as multi-positive image→text retrieval: every caption in the
global batch with the image's id (its Fashion-MNIST class, or the same emoji) is a positive, each normalised only
against itself and the true negatives, so positives do not compete. Fixed τ = 0.05 as in DEXML's normalised
settings. Other modes: --config.loss.mode=softmax (multi-label InfoNCE) or topk (soft top-k).

    python -m big_embed.main --config configs/dexml.py --workdir runs/dexml
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("dexml", query_tower="image", label_tower="text", in_batch_ids=True,
                   mode="decoupled", temperature=0.05)
  return c
