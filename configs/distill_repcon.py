"""Representation-consolidation-style distillation (Li et al. 2021; reconstructed, §7): τ²-scaled KL from the
teacher's similarity rows, one head per teacher (here one teacher: the quickstart model).

    python -m big_embed.main --config configs/distill_repcon.py --workdir runs/distill_repcon
"""

import pathlib

from big_embed import config_utils
from big_embed import losses
from big_embed.train import teacher


def get_config(arg=None):
  c = config_utils.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.teacher = teacher.default_config()
  c.teacher.workdir = "runs/quickstart"
  c.loss = losses.loss_config("similarity_kd", scale=20.0, inner=losses.loss_config(
      "repcon_kd", students=("logits",), teachers=("teacher_logits",), weights=(1.0,), temperature=2.0))
  return c
