"""Representation-consolidation-style distillation (Li et al. 2021; reconstructed, §7): τ²-scaled KL from the
teacher's similarity rows, one head per teacher (here one teacher: the quickstart model).

    python -m big_embed.main --config configs/distill_repcon.py --workdir runs/distill_repcon
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.teacher.workdir = "runs/quickstart"
  c.loss = cu.loss("similarity_kd", temperature=0.05, inner=cu.loss(
      "repcon_kd", students=("logits",), teachers=("teacher_logits",), weights=(1.0,), temperature=2.0))
  return c
