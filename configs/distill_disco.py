"""DisCo-style embedding distillation (Gao et al., ECCV 2022): a smaller student trained with the CLIP loss plus
the summed squared error between its embeddings and a frozen teacher's (both towers).

The teacher is the quickstart model: train it first (`configs/quickstart.py`, workdir runs/quickstart), or point
--config.teacher.workdir at any run trained on the same prepared data with the same embedding size.

    python -m big_embed.main --config configs/distill_disco.py --workdir runs/distill_disco
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  c = cu.load_recipe(pathlib.Path(__file__).with_name("quickstart.py"), arg)
  if not cu.parse_arg(arg, tiny=False).tiny:  # a student half the teacher's depth
    c.model.vision.depth = 2
    c.model.text.depth = 1
  c.teacher.workdir = "runs/quickstart"
  c.loss = cu.loss("disco_mse", students=("image", "text"), teachers=("teacher_image", "teacher_text"),
                   teacher_from="batch", reduction="sum", inner=cu.loss("clip"))
  return c
