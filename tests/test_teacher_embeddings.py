"""Precomputed teacher embeddings (`python -m big_embed.embed_teacher`, `data.teacher_embeddings`, a retrieval
task's `teacher_embeddings`): a task's batches carry the store's rows of their texts, and the distillation losses
computed from them equal the losses with the same teacher run inside the step (`train.teacher.Teacher`, an
independent path: the batch's own token ids, the whole batch at once). Errors are one line naming the fix."""

import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_embed import embed_teacher
from big_embed import encode
from big_embed import losses
from big_embed import models
from big_embed.data import DataError
from big_embed.data import mined_negatives
from big_embed.data import sources
from big_embed.data import teacher_embeddings as te
from big_embed.data import text_batches
from big_embed.data import text_records
from big_embed.data import text_tasks
from big_embed.errors import ConfigError
from big_embed.models import text_embedder
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import teacher as teacher_lib
from tests import tiny

TASK, DATASET = "bible", "bible"
MAX_RECORDS, BATCH, H, DIM = 40, 8, 3, 384
STORE, MINED = "test_teacher_store_minilm", "test_teacher_store_mined"  # in the session's shared data dir
QP, DP = "query: ", "passage: "
OUTPUTS = {"query": "teacher_query", "key": "teacher_key", "hard_negatives": "teacher_hard_negatives"}


def _config(data_dir, **task):
  """The tiny retrieval recipe (MiniLM's tokenizer, 16-token texts) with prefixes and a small bible task."""
  c = tiny.recipe("text_retrieval", "tiny")
  c.data.data_dir = str(data_dir)
  c.model.query_prefix, c.model.doc_prefix = QP, DP
  c.data.tasks.bible.update(dict(max_records=MAX_RECORDS, batch_size=BATCH, num_negatives=H, mined=MINED,
                                 teacher_embeddings=STORE))
  c.data.tasks.bible.update(task)
  return c


def _one_line(err) -> str:
  text = str(err.value)
  assert "\n" not in text, text
  return text


@pytest.fixture(scope="module")
def num_records(text_data_dir):
  return len(sources.read_all(DATASET, text_data_dir, "train"))


@pytest.fixture(scope="module")
def mined(text_data_dir, num_records):
  """A hand-made mined set over the first MAX_RECORDS records: H + 1 candidates per row, some -1."""
  rng = np.random.default_rng(0)
  neg = np.full((num_records, H + 1), -1, np.int64)
  neg[:MAX_RECORDS] = rng.integers(-1, MAX_RECORDS, size=(MAX_RECORDS, H + 1))
  neg[:MAX_RECORDS:3, 1:] = -1  # every third row has at most one candidate: padded slots
  mined_negatives.write_mined_negatives(
      mined_negatives.mined_dir(text_data_dir, MINED), source_dataset=DATASET, split="train", query_field="kjv",
      doc_field="web", negatives=neg, scores=np.zeros(neg.shape, np.float32), meta={"command": "by hand"})
  return neg


@pytest.fixture(scope="module")
def store(text_data_dir, mined):  # pylint: disable=unused-argument
  out = embed_teacher.embed_teacher(_config(text_data_dir), TASK, "minilm", STORE, batch_size=16,
                                    command="python -m big_embed.embed_teacher --test")
  return te.read_teacher_embeddings(out)


@pytest.fixture(scope="module")
def minilm():
  return encode.load_pretrained("minilm")


def _open(data_dir, tokenizer, **task):
  """The task's batch builder, as the training stream opens it."""
  c = _config(data_dir, **task)
  spec = text_tasks.resolve_tasks(c.data, c.train.batch_size)[TASK]
  m = models.resolve(c.model)
  return text_batches.open_task(spec, text_records.ColumnReader(str(data_dir)),
                                sources.features(DATASET, str(data_dir)), str(data_dir), tokenizer=tokenizer,
                                max_len=m.max_text_len, query_prefix=m.query_prefix, doc_prefix=m.doc_prefix,
                                seed=0, process_count=1)


def test_the_store_holds_every_records_texts_as_the_task_reads_them(store, num_records):
  info = store.info
  assert info["dataset"] == DATASET and info["split"] == "train" and info["fields"] == {"query": "kjv", "doc": "web"}
  assert info["num_records"] == num_records > MAX_RECORDS and info["embedded_records"] == MAX_RECORDS
  assert info["max_text_len"] == 16 and info["prefixes"] == {"query": QP, "doc": DP} and info["dim"] == DIM
  assert info["meta"]["model"] == "minilm" and info["meta"]["command"].endswith("--test")
  assert isinstance(store.query, np.memmap) and store.query.shape == store.doc.shape == (num_records, DIM)
  np.testing.assert_allclose(np.linalg.norm(store.query[:MAX_RECORDS], axis=1), 1.0, atol=1e-5)
  assert not np.any(store.doc[MAX_RECORDS:])  # rows beyond the embedded records are zeros
  again = pickle.loads(pickle.dumps(store))  # a data worker maps the files again
  assert isinstance(again.doc, np.memmap) and np.array_equal(again.doc[:MAX_RECORDS], store.doc[:MAX_RECORDS])


def test_precomputed_teacher_rows_give_the_losses_of_the_in_step_teacher(text_data_dir, store, minilm):
  del store
  batch = _open(text_data_dir, minilm.tokenizer).batch(0, 0)
  valid = batch["hard_negative_valid"]
  assert batch["teacher_query"].shape == (BATCH, DIM) and batch["teacher_hard_negatives"].shape == (BATCH, H, DIM)
  assert batch["teacher_hard_negatives"].dtype == np.float32 and valid.any() and not valid.all()
  assert not np.any(batch["teacher_hard_negatives"][~valid])

  teacher = teacher_lib.Teacher(model=minilm.model, params=minilm.params, outputs=OUTPUTS, step=0,
                                inputs=text_embedder.TEXT_INPUTS)
  tokens = {k: batch[k] for k in ("query", "key", "hard_negatives", "hard_negative_valid")}
  in_step = jax.device_get(jax.jit(teacher.annotate)(teacher.params, tokens))
  for key in ("teacher_query", "teacher_key"):
    np.testing.assert_allclose(batch[key], in_step[key], atol=2e-5, err_msg=key)
  np.testing.assert_allclose(batch["teacher_hard_negatives"][valid], in_step["teacher_hard_negatives"][valid],
                             atol=2e-5)

  rng = np.random.default_rng(1)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
  emb = {"query": unit(rng.normal(size=(BATCH, DIM))), "key": unit(rng.normal(size=(BATCH, DIM))),
         "hard_negatives": unit(rng.normal(size=(BATCH, H, DIM)))}
  precomputed = {k: batch[k] for k in (*OUTPUTS.values(), "hard_negative_valid")}
  mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:1])
  for name, fields in (("teacher_kl", dict(teacher_source="embeddings", temperature=0.05, teacher_temperature=0.05,
                                           hard_label_weight=0.1)),
                       ("disco_mse", dict(students=("query", "key"), teachers=("teacher_query", "teacher_key"),
                                          teacher_from="batch"))):
    spec = losses.get(name)
    cfg = losses.loss_config(name, **fields)
    spec.validate(cfg)
    loss_fn = jax.jit(spec.build(cfg, mesh))
    params = spec.init_params(cfg)
    want, _ = loss_fn(emb, in_step, params, 0)
    got, _ = loss_fn(emb, precomputed, params, 0)
    assert np.isfinite(float(want)) and float(want) != 0, name
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=name)


def test_batches_without_hard_negatives_carry_query_and_key_rows(text_data_dir, store, minilm):
  task = _open(text_data_dir, minilm.tokenizer, num_negatives=0, mined="")
  batch = task.batch(0, 0)
  rows = task.record_indices(0, 0)
  assert "teacher_hard_negatives" not in batch and "hard_negatives" not in batch
  np.testing.assert_array_equal(batch["teacher_query"], store.query[rows])
  np.testing.assert_array_equal(batch["teacher_key"], store.doc[rows])


@pytest.mark.parametrize("change, match", [
    (dict(max_text_len=32), "max_text_len is 32, the task needs 16"),
    (dict(prefixes={"query": "", "doc": DP}), "prefixes is {'query': '', 'doc': 'passage: '}"),
    (dict(split="test"), "split is 'test'"),
    (dict(fields={"query": "web", "doc": "kjv"}), "fields is {'query': 'web', 'doc': 'kjv'}"),
    (dict(embedded_records=MAX_RECORDS - 1), f"embedded_records is {MAX_RECORDS - 1}, the task needs '>= "),
])
def test_a_store_of_other_texts_is_one_line_naming_the_difference(text_data_dir, num_records, mined, minilm,
                                                                   change, match):
  del mined
  change = dict(change)
  embedded = change.pop("embedded_records", MAX_RECORDS)
  facts = te.task_facts(dataset=DATASET, split="train", query_field="kjv", doc_field="web", num_records=num_records,
                        max_text_len=16, query_prefix=QP, doc_prefix=DP)
  zeros = np.zeros((num_records, 4), np.float32)
  te.write_teacher_embeddings(te.store_dir(text_data_dir, "test_teacher_store_bad"), query=zeros, doc=zeros,
                              facts={**facts, **change}, embedded_records=embedded, meta={"command": "embed --old"})
  with pytest.raises(DataError) as e:
    _open(text_data_dir, minilm.tokenizer, teacher_embeddings="test_teacher_store_bad")
  line = _one_line(e)
  assert f"do not match task {TASK!r}" in line and match in line, line
  assert "python -m big_embed.embed_teacher --config <this recipe> --task bible" in line and "embed --old" in line


def test_a_missing_store_names_the_command_that_makes_it(text_data_dir, mined, minilm):
  del mined
  with pytest.raises(DataError) as e:
    _open(text_data_dir, minilm.tokenizer, teacher_embeddings="no_such_store")
  line = _one_line(e)
  assert line.startswith("No teacher embeddings 'no_such_store' in ") and (
      "python -m big_embed.embed_teacher --config <this recipe> --task bible --model <the teacher> --name "
      "no_such_store" in line), line


@pytest.mark.parametrize("task, match", [
    (dict(type="sts", dataset="lee50", split="test", num_negatives=0, mined="", max_records=0),
     r"^config\.data\.tasks\.bible\.teacher_embeddings='test_teacher_store_minilm', but only retrieval tasks read "
     "teacher embeddings; set it to ''$"),
    (dict(mined=""), r"^config\.data\.tasks\.bible\.teacher_embeddings='test_teacher_store_minilm' with "
                     r"num_negatives=3 and no mined set: the records' own negative texts have no teacher embeddings"),
    (dict(teacher_embeddings="../elsewhere"), r"^config\.data\.tasks\.bible\.teacher_embeddings='\.\./elsewhere' "
                                              "holds a path separator"),
])
def test_a_task_that_cannot_read_teacher_embeddings_is_one_config_error(text_data_dir, task, match):
  c = _config(text_data_dir, **task)
  with pytest.raises(ConfigError, match=match) as e:
    text_tasks.resolve_tasks(c.data, c.train.batch_size)
  _one_line(e)


def test_embed_teacher_checks_task_and_name_before_embedding(text_data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(encode, "load", lambda *a, **k: pytest.fail("embedded before checking the arguments"))
  c = _config(text_data_dir)
  with pytest.raises(ConfigError, match=r"^--task='nope' is not a retrieval task of config\.data\.tasks; "
                                        r"retrieval tasks: \['bible'\]") as e:
    embed_teacher.embed_teacher(c, "nope", "minilm", "x", batch_size=8)
  _one_line(e)
  with pytest.raises(ConfigError, match="^--name='../x' holds a path separator") as e:
    embed_teacher.embed_teacher(c, TASK, "minilm", "../x", batch_size=8)
  _one_line(e)
  c.data.data_dir = str(tmp_path)
  keep = tmp_path / te.STORE_DIR / "keep"
  keep.mkdir(parents=True)
  (keep / "mine.txt").write_text("not a store")
  with pytest.raises(ConfigError, match="^refusing to replace .*keep: it is not a teacher-embedding store") as e:
    embed_teacher.embed_teacher(c, TASK, "minilm", "keep", batch_size=8)
  _one_line(e)
  assert (keep / "mine.txt").read_text() == "not a store"


def test_the_command_reports_a_bad_task_in_one_error_line(text_data_dir):
  proc = subprocess.run(
      [sys.executable, "-m", "big_embed.embed_teacher", "--config", "configs/text_retrieval.py:tiny",
       f"--config.data.data_dir={text_data_dir}", "--task", "nope", "--model", "minilm", "--name", "x"],
      cwd=tiny.ROOT, capture_output=True, text=True, timeout=300, check=False)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith("error: --task='nope' is not a retrieval task"), proc.stderr[-3000:]
