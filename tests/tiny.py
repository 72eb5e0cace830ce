"""The quickstart recipe's tiny variant (`configs/quickstart.py:tiny`) for fast tests."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_recipe(name: str):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(data_dir: str = "", steps: int = 6):
  c = load_recipe("quickstart").get_config("tiny")
  c.data.data_dir = str(data_dir)
  c.train.steps = steps
  c.train.eval_every = steps
  return c
