"""Piccolo2's hybrid loss (Huang et al. 2024, §3) on the quickstart data: the retrieval branch (InfoNCE, τ = 0.01,
per-device negatives as in Piccolo2) averaged over Matryoshka prefixes of the embedding.

The quickstart data holds one task (image-caption retrieval), so every batch takes the retrieval branch; the STS
(CoSENT, weight 0.04) and classification (label-text negatives, weight 0.2) branches are chosen by a batch's
`task` and need task-homogeneous multi-task data. `configs/cosent.py` trains the STS loss on its own.

    python -m big_embed.main --config configs/piccolo2_hybrid.py --workdir runs/piccolo2_hybrid
"""

import pathlib

from big_embed import config_utils
from big_embed import losses


def get_config(arg=None):
  c = config_utils.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  e = c.model.embed_dim
  c.loss = losses.loss_config("hybrid", task="retrieval", query_tower="image", key_tower="text",
                              mrl_dims=(e // 4, e // 2, e), mrl_reduction="mean")
  return c
