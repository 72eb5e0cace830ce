"""Recipes and the config schema: recipes load without the JAX stack, every field is checked with a one-line error."""

import json
import subprocess
import sys

import pytest

from big_embed import config_schema
from big_embed import config_utils
from big_embed.errors import ConfigError
from tests import tiny

RECIPES = sorted(p.stem for p in (tiny.ROOT / "configs").glob("*.py"))
ARGS = {"pretrained_minilm": (None, "sts")}
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "grain", "tensorflow_datasets", "tensorflow", "torch")


def test_loading_every_recipe_imports_no_jax():
  """A fresh interpreter loads (and schema-checks) every recipe with each of its arguments, and none of the heavy
  stack is imported: a flag error is reported before JAX loads."""
  script = f"""
import json, pathlib, sys
from big_embed import config_schema, config_utils
args = {ARGS!r}
for path in sorted(pathlib.Path("configs").glob("*.py")):
  for arg in args.get(path.stem, (None, "tiny")):
    config_schema.validate(config_utils.load_recipe(path, arg))
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))
"""
  proc = subprocess.run([sys.executable, "-c", script], cwd=tiny.ROOT, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_fits_the_schema(name):
  for arg in ARGS.get(name, (None, "tiny")):
    config_schema.validate(tiny.recipe(name, arg))


def test_bad_fields_are_one_line_errors_naming_the_field():
  c = tiny.recipe("quickstart")
  c.model.dtype = "bf16"
  with pytest.raises(ConfigError, match=r"config\.model\.dtype='bf16' is not one of 'float32', 'bfloat16'; "
                                        r"did you mean 'bfloat16'\?"):
    config_schema.validate(c)
  c = tiny.recipe("quickstart")
  c.train.batch_sise = 32
  with pytest.raises(ConfigError, match=r"config\.train\.batch_sise is not a config field; did you mean "
                                        r"'batch_size'\?"):
    config_schema.validate(c)
  c = tiny.recipe("text_retrieval")
  c.model.pooling = "max"
  with pytest.raises(ConfigError, match=r"config\.model\.pooling='max'"):
    config_schema.validate(c)
  c.model.pooling = "mean"
  c.model.image_size = 32  # a two-tower field on a text model
  with pytest.raises(ConfigError, match=r"config\.model\.image_size is not a config field"):
    config_schema.validate(c)
  c = tiny.recipe("text_retrieval")
  c.data.tasks.bible.weigth = 2.0
  with pytest.raises(ConfigError, match=r"config\.data\.tasks\.bible\.weigth .*did you mean 'weight'"):
    config_schema.validate(c)


def test_every_schema_field_has_a_default_and_a_description():
  def walk(schema, where):
    for name, entry in schema.items():
      if isinstance(entry, config_schema.Field):
        assert entry.help and not entry.help.endswith("."), f"{where}.{name}"
        if entry.choices is not None:
          assert entry.default in entry.choices, f"{where}.{name}"
      else:
        walk(entry, f"{where}.{name}")

  for name in ("TOP", "MESH", "TRAIN", "TWO_TOWER_MODEL", "TEXT_MODEL", "DATA", "TEXT_TASK", "TEACHER"):
    walk(getattr(config_schema, name), name)
  c = config_schema.base_config("text")
  assert c.model.type == "text" and c.model.pooling == "" and c.model.max_text_len == 0 and c.train.batch_size == 256
  config_schema.validate(c)


def test_parse_arg():
  assert config_utils.parse_arg(None, tiny=False).tiny is False
  assert config_utils.parse_arg("tiny", tiny=False).tiny is True
  got = config_utils.parse_arg("tiny,steps=3,name=x", tiny=False, steps=0, name="")
  assert (got.tiny, got.steps, got.name) == (True, 3, "x")
  assert config_utils.parse_arg("tiny=false", tiny=True).tiny is False
  with pytest.raises(ConfigError, match="unknown 'tinyy'; this recipe takes: tiny"):
    config_utils.parse_arg("tinyy", tiny=False)
  with pytest.raises(ConfigError, match="steps=many"):
    config_utils.parse_arg("steps=many", steps=0)
  with pytest.raises(ConfigError, match="needs a value"):
    config_utils.parse_arg("steps", steps=0)


def test_text_task_fields():
  task = config_utils.text_task(type="sts", dataset="lee50", fields={"score": "similarity"})
  assert task.type == "sts" and task.fields.score == "similarity" and task.fields.text_a == ""  # "" = the dataset's
  with pytest.raises(ConfigError, match="no field"):
    config_utils.text_task(kind="sts")
  with pytest.raises(ConfigError, match="no role"):
    config_utils.text_task(fields={"passage": "doc"})


def test_inference_entry_points_do_not_import_the_trainer():
  """`encode` and `mine` restore runs through `big_embed.run`; the training package stays out of them."""
  script = "import sys, big_embed.encode, big_embed.mine; print(sorted(m for m in sys.modules if 'big_embed.train' in m))"
  proc = subprocess.run([sys.executable, "-c", script], cwd=tiny.ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"
