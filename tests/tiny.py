"""The quickstart recipe's tiny variant (`configs/quickstart.py:tiny`) for fast tests."""

import pathlib

from big_embed import config_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]


def recipe(name: str, arg: str | None = None):
  return config_utils.load_recipe(ROOT / "configs" / f"{name}.py", arg)


def tiny_config(data_dir: str = "", steps: int = 6, name: str = "quickstart"):
  c = recipe(name, "tiny")
  c.data.data_dir = str(data_dir)
  c.train.steps = steps
  c.train.eval_every = steps
  return c
