"""Logit distillation over in-batch similarities (similarity_kd + logit_kd): the student's image→text similarity
rows match the frozen quickstart teacher's, by KL (or --config.loss.inner.mode=reverse_kl | js | soft_ce | mse).

    python -m big_embed.main --config configs/distill_logit_kd.py --workdir runs/distill_logit_kd
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.teacher.workdir = "runs/quickstart"
  c.loss = cu.loss("similarity_kd", temperature=0.05,
                   inner=cu.loss("logit_kd", mode="kl", temperature=2.0, t2_factor=True))
  return c
