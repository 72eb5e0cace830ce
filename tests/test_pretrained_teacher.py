"""A pretrained text model as the frozen teacher (`config.teacher.pretrained`): its in-step embeddings are the
model's own (`encode.load("minilm")`, an independent path: length-grouped batches, no train step), a tiny student
distils it end to end, and the source is validated before anything compiles."""

import json
import math

import jax
import numpy as np
import pytest

from big_embed import config_schema
from big_embed import encode
from big_embed.errors import ConfigError
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import loop
from big_embed.train import teacher as teacher_lib
from tests import tiny

TEXTS = ["A man is playing a guitar.", "the act of moving something from one place to another",
         "A cat sleeps on the sofa.", "sound"]


def test_the_teacher_embeds_a_batch_as_the_pretrained_model_encodes_it():
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  model = encode.load("minilm", mesh=mesh)
  cfg = config_schema.teacher_defaults()
  cfg.pretrained = "minilm"
  cfg.outputs = {"query": "teacher_query", "key": "teacher_key"}
  teacher = teacher_lib.load_teacher(cfg, mesh, model.tokenizer)
  assert teacher.step == 0 and teacher.inputs == ("query", "key", "hard_negatives", "label")
  max_len = 32
  tokens = model.tokenizer.encode_batch(TEXTS, max_len)  # int32 [4, 32]
  batch = {"query": tokens, "key": tokens[::-1].copy()}
  out = jax.jit(teacher.annotate)(teacher.params, batch)
  expected = model.encode(TEXTS, batch_size=2)  # [4, 384]
  np.testing.assert_allclose(np.asarray(out["teacher_query"]), expected, atol=2e-5)
  np.testing.assert_allclose(np.asarray(out["teacher_key"]), expected[::-1], atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(expected, axis=-1), 1.0, atol=1e-5)


def test_a_teacher_needs_exactly_one_source():
  cfg = tiny.recipe("distill_minilm", "sinkd,tiny")
  cfg.teacher.workdir = "runs/some_teacher"
  with pytest.raises(ConfigError, match=r"^config\.teacher\.workdir='runs/some_teacher' and config\.teacher\."
                                        r"pretrained='minilm' are both set"):
    config_schema.validate(cfg)
  cfg.teacher.workdir = cfg.teacher.pretrained = ""
  with pytest.raises(ConfigError, match=r"^config\.teacher: give one of workdir \(''\) and pretrained \(''\), not "
                                        "neither"):
    teacher_lib.load_teacher(cfg.teacher, None, None)
  cfg.teacher.pretrained = "minilm"
  cfg.data.tasks.wordnet.teacher_embeddings = "wordnet_minilm"
  with pytest.raises(ConfigError, match=r"^config\.data\.tasks\.wordnet\.teacher_embeddings is set and so is "
                                        r"config\.teacher"):
    config_schema.validate(cfg)


def test_an_unknown_pretrained_teacher_is_one_error_line():
  cfg = config_schema.teacher_defaults()
  cfg.pretrained = "no_such_model"
  with pytest.raises(ConfigError, match=r"^config\.teacher\.pretrained: pretrained='no_such_model' is neither a "
                                        "known name"):
    teacher_lib.load_teacher(cfg, mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), None)


@pytest.mark.slow
def test_a_student_distils_the_pretrained_minilm(text_data_dir, tmp_path, capfd):
  """The tiny 1-layer student (MiniLM's tokenizer) distils the whole MiniLM with SinKD for 3 steps."""
  cfg = tiny.recipe("distill_minilm", "sinkd,tiny")
  cfg.data.data_dir = str(text_data_dir)
  cfg.train.log_every = 1
  loop.train_and_evaluate(cfg, str(tmp_path))
  assert "Teacher: minilm (step 0)" in capfd.readouterr().out
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  parts = [r for r in records if "train/loss" in r]
  assert len(parts) == 3
  for r in parts:  # SinKD's KD and Sinkhorn parts are there and finite: the teacher's rows reached the loss
    keys = [k for k in r if k.startswith("train/") and k.rsplit("/", 1)[-1] in ("loss", "kd", "sinkhorn")]
    assert len(keys) == 3 and all(math.isfinite(r[k]) and r[k] != 0 for k in keys), r
