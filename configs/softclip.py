"""SoftCLIP (Gao et al. 2024): one-hot targets softened by intra-modal self-similarity, plus neg-KL.

The soft targets of image→text rows come from image-image similarity and those of text→image rows from
text-text similarity (the towers' own embeddings, stop-gradient); α, τ_s and β are the unverified defaults of
shared ALGORITHMS.md §1.

    python -m big_embed.main --config configs/softclip.py --workdir runs/softclip
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("softclip", towers=("image", "text"), target_source_i2t="image",
                   target_source_t2i="text", alpha=0.2, target_temperature=0.1, beta=1.0)
  return c
