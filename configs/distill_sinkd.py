"""SinKD (Cui et al., LREC-COLING 2024) over in-batch similarity logits: (1−α)·CE + α·KD + β·Sinkhorn between
the student's and the frozen quickstart teacher's similarity rows (batch-wise transport across rows).

    python -m big_embed.main --config configs/distill_sinkd.py --workdir runs/distill_sinkd
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.teacher.workdir = "runs/quickstart"
  c.loss = cu.loss("similarity_kd", temperature=0.05,
                   inner=cu.loss("sinkd", alpha=0.5, beta=0.8, kd_temperature=2.0, sinkhorn_mode="log"))
  return c
