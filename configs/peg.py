"""PEG-style progressive weighting (§4.3, unverified) over image→text InfoNCE: focal query weights whose
exponent ramps up over the run. Switch to hardness-weighted negatives with --config.loss.peg_mode=hardness.

    python -m big_embed.main --config configs/peg.py --workdir runs/peg
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.loss = cu.loss("peg", query_tower="image", key_tower="text", temperature=0.05, peg_mode="focal",
                   gamma_max=2.0, peg_ramp_steps=c.train.steps)
  return c
