"""The run assembly's checks (train/experiment.py): text task types against the loss, model kinds against the data,
batch sizes and sharding rules against the mesh — each a one-line ConfigError before anything is read or compiled."""

import jax
import pytest

from big_embed import config_utils as cu
from big_embed import losses
from big_embed.errors import ConfigError
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import experiment
from tests import tiny


def _text_config(loss, **types):
  c = tiny.recipe("text_retrieval", "tiny")
  c.data.tasks = {name: cu.text_task(type=t, dataset="bible") for name, t in types.items()}
  c.loss = losses.resolve(loss)
  return c


@pytest.mark.parametrize("loss,types,message", [
    (cu.loss("hybrid"), dict(a="retrieval", b="multilabel"),
     r"loss 'hybrid' trains only on retrieval/sts/classification tasks, but config\.data\.tasks has b \(multilabel\)"),
    (cu.loss("dexml"), dict(a="retrieval"),
     r"trains only on multilabel tasks, but config\.data\.tasks has a \(retrieval\)"),
    (cu.loss("infonce"), dict(a="retrieval", b="sts"), r"has b \(sts\); remove them or pick a loss for them \(one of "
                                                       r"hybrid\)"),
    (cu.loss("cosent"), dict(a="retrieval"), r"loss 'cosent' trains only on sts tasks"),
    (cu.loss("infonce"), dict(a="classification", b="multilabel"), r"no single loss trains on all of them"),
])
def test_task_types_the_loss_cannot_train_are_rejected(loss, types, message):
  with pytest.raises(ConfigError, match=message):
    experiment.check_task_types(_text_config(loss, **types))


def test_task_types_the_loss_trains_pass():
  experiment.check_task_types(_text_config(cu.loss("matryoshka", inner=cu.loss("infonce"), dims=(8, 16)),
                                           a="retrieval"))  # a wrapper answers for its inner loss
  experiment.check_task_types(_text_config(cu.loss("hybrid"), a="retrieval", b="sts", c="classification"))
  experiment.check_task_types(_text_config(cu.loss("dexml"), a="multilabel"))


def test_model_kind_must_fit_the_data():
  c = _text_config(cu.loss("infonce"), a="retrieval")
  c.model = tiny.recipe("quickstart").model
  with pytest.raises(ConfigError, match=r"text tasks, but config\.model\.type='two_tower'"):
    experiment.check_task_types(c)
  c = tiny.recipe("text_retrieval", "tiny")
  c.data.tasks = {}
  c.data.mixture = {"emoji": 1.0}
  c.loss = losses.resolve(c.loss)
  with pytest.raises(ConfigError, match=r"config\.data\.mixture is image-text data, but config\.model\.type='text'"):
    experiment.check_task_types(c)


def test_check_config_resolves_the_loss_and_checks_the_mesh():
  mesh = mesh_lib.make_mesh({"data": -1})
  c = tiny.recipe("quickstart", "tiny")
  resolved, tasks = experiment.check_config(c, mesh)
  assert tasks == {} and resolved.loss.tile_size == losses.loss_config("clip").tile_size  # defaults filled in
  assert "tile_size" not in c.loss  # the caller's config is not changed
  for field, value, message in [
      ("batch_size", 12, r"config\.train\.batch_size=12 is not divisible by the 8 data-parallel shards"),
      ("steps", 0, r"config\.train\.steps must be an integer >= 1, got 0"),
      ("learning_rate", -1.0, r"config\.train\.learning_rate must be a finite number > 0, got -1\.0"),
      ("embed_chunk_size", -4, r"config\.train\.embed_chunk_size must be an integer >= 0, got -4"),
  ]:
    bad = tiny.recipe("quickstart", "tiny")
    bad.train[field] = value
    with pytest.raises(ConfigError, match=message):
      experiment.check_config(bad, mesh)
  bad = tiny.recipe("quickstart", "tiny")
  bad.sharding_rules = (("embed", "model"),)
  with pytest.raises(ConfigError, match=r"config\.sharding_rules has \('embed', 'model'\)"):
    experiment.check_config(bad, mesh)
  bad = tiny.recipe("quickstart", "tiny")
  bad.loss.temperature = 0.0
  with pytest.raises(ConfigError, match=r"config\.loss\.temperature must be a finite number > 0"):
    experiment.check_config(bad, mesh)
  assert jax.device_count() == 8
