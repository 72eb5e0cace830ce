"""Teacher soft labels (LG-ANNA style, §10): KL from a frozen dense teacher's in-batch score distribution to the
student's, plus a small hard-label InfoNCE term. The teacher is the quickstart model.

    python -m big_embed.main --config configs/teacher_kl.py --workdir runs/teacher_kl
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  c.teacher.workdir = "runs/quickstart"
  c.teacher.outputs = {"image": "teacher_query", "text": "teacher_key"}  # where teacher_kl reads them
  c.loss = cu.loss("teacher_kl", query_tower="image", key_tower="text", teacher_source="embeddings",
                   temperature=0.05, teacher_temperature=0.05, hard_label_weight=0.1)
  return c
