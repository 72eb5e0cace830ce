"""Every recipe in configs/ trains end to end (tiny variant, a few steps): image-text recipes on the quickstart
data, text recipes on the text corpora. `pretrained_minilm` only evaluates (tests/test_text_end_to_end.py)."""

import json
import math

import pytest

from big_embed.train import loop
from tests import tiny

EVAL_ONLY = ("pretrained_minilm",)
RECIPES = sorted(p.stem for p in (tiny.ROOT / "configs").glob("*.py"))
TRAIN_RECIPES = [name for name in RECIPES if name not in EVAL_ONLY]
STEPS = 3


@pytest.fixture(scope="module")
def teacher_workdir(data_dir, tmp_path_factory):
  """A tiny quickstart run, the frozen teacher of the distillation recipes."""
  workdir = tmp_path_factory.mktemp("teacher")
  loop.train_and_evaluate(tiny.tiny_config(data_dir, steps=2), str(workdir))
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAIN_RECIPES)
def test_recipe_trains(name, tmp_path, request):
  is_text = tiny.recipe(name).model.get("type", "two_tower") == "text"
  data_dir = request.getfixturevalue("text_data_dir" if is_text else "data_dir")
  cfg = tiny.tiny_config(data_dir, steps=STEPS, name=name)
  cfg.train.log_every = 1
  cfg.train.checkpoint_every = STEPS
  if cfg.teacher.workdir:  # a distillation recipe: its teacher is a tiny quickstart run
    cfg.teacher.workdir = str(request.getfixturevalue("teacher_workdir"))
  results = loop.train_and_evaluate(cfg, str(tmp_path))
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == STEPS and all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
  assert set(results) == set(cfg.evals)


def _loss_names(cfg):
  names = {cfg.name}
  if "inner" in cfg:
    names |= _loss_names(cfg.inner)
  return names


def test_every_registered_loss_has_a_recipe():
  from big_embed import losses  # pylint: disable=g-import-not-at-top
  covered = set().union(*(_loss_names(tiny.recipe(name).loss) for name in RECIPES))
  assert covered == set(losses.names()), sorted(set(losses.names()) - covered)
