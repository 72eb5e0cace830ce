r"""Precomputed teacher embeddings: embed a retrieval task's texts once with a frozen teacher, for distillation
without running the teacher in every train step.

    python -m big_embed.embed_teacher --config configs/text_retrieval.py --task bible --model minilm \
        --name bible_minilm [--batch_size 256]

For the task's split (`config.data.tasks[task]`: dataset, split, query and doc fields; its first max_records
records when that is set), every record's query and document text is embedded with `--model` (a run's workdir or
a pretrained model, `encode.load`) exactly as the student's batches hold it: the recipe's query / doc prefix
before it (`config.model.query_prefix` / `doc_prefix`, as the checkpoint resolves them), cut at the recipe's
`config.model.max_text_len` tokens of the teacher's tokenizer (the student's token ids, when the two share a
tokenizer), unit-normalised as the in-step teacher's embeddings are. The rows (zeros for a record with an empty
field) go to `<data_dir>/teacher_embeddings/<name>/` (`data.teacher_embeddings`), which the task reads with
`teacher_embeddings=<name>`: its batches then carry teacher_query, teacher_key and teacher_hard_negatives.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from big_embed import encode
from big_embed import models
from big_embed.data import paths
from big_embed.data import sources
from big_embed.data import teacher_embeddings
from big_embed.data import text_records
from big_embed.data import text_tasks
from big_embed.errors import ConfigError, exit_on_user_error

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program: importing the module (tests, other commands with
  a --config of their own, such as big_embed.mine) defines none."""
  _FLAGS.update(
      config=config_flags.DEFINE_config_file("config", None, "Recipe whose task is embedded.", lock_config=True),
      task=flags.DEFINE_string("task", "", "Retrieval task name in config.data.tasks (default: the only one)."),
      model=flags.DEFINE_string("model", None, "The teacher: a run's workdir, 'minilm' or a HF BERT directory."),
      name=flags.DEFINE_string("name", None, "Name of the store, <data_dir>/teacher_embeddings/<name>."),
      batch_size=flags.DEFINE_integer("batch_size", 256, "Texts per encoding batch."))
  flags.mark_flags_as_required(["config", "model", "name"])


def retrieval_task(config: ml_collections.ConfigDict, task_name: str) -> text_tasks.TaskSpec:
  """The retrieval task `task_name` of `config.data.tasks` (default: the only retrieval task).

  Raises:
    ConfigError: no such retrieval task (the message lists them), or `task_name` is empty and there is not
      exactly one.
  """
  tasks = text_tasks.resolve_tasks(config.data, config.train.batch_size) if config.data.get("tasks") else {}
  retrieval = [n for n, t in tasks.items() if t.type == "retrieval"]
  if not task_name and len(retrieval) == 1:
    task_name = retrieval[0]
  if task_name not in retrieval:
    raise ConfigError(f"--task={task_name!r} is not a retrieval task of config.data.tasks; retrieval tasks: "
                      f"{retrieval} (pass one with --task)")
  return tasks[task_name]


def _student_view(encoder: encode.Embedder, max_len: int, prefixes: dict[str, str]) -> encode.Embedder:
  """The teacher `encoder` with the student's texts: `prefixes` {"query", "doc"} before them, cut at `max_len`."""
  model_config = {**encoder.model_config.to_dict(), "max_text_len": max_len, "query_prefix": prefixes["query"],
                  "doc_prefix": prefixes["doc"]}
  return encode.Embedder(encoder.model, encoder.params, encoder.tokenizer, ml_collections.ConfigDict(model_config),
                         encoder.mesh, step=encoder.step, name=encoder.name, normalize=encoder.normalize)


def _embed(view: encode.Embedder, texts: list[str], role: str, batch_size: int) -> np.ndarray:
  """float32 [N, D] unit rows of `texts` with the `role` prefix (each distinct text embedded once); zeros for
  empty texts."""
  slot: dict[str, int] = {}
  for t in texts:
    if t:
      slot.setdefault(t, len(slot))
  emb = view.encode(list(slot), batch_size=batch_size, role=role)  # [distinct, D]
  emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
  rows = [i for i, t in enumerate(texts) if t]
  out = np.zeros((len(texts), emb.shape[1]), np.float32)
  out[rows] = emb[[slot[texts[i]] for i in rows]]
  return out


def embed_teacher(config: ml_collections.ConfigDict, task_name: str, model: str, name: str, *, batch_size: int,
                  command: str = "") -> str:
  """Embeds the query and document texts of retrieval task `task_name` of `config` with the teacher `model` into
  the store `name`; returns its directory. `command` (the command line that reruns this) goes into its info.json.

  Raises:
    ConfigError: no such retrieval task, no --model, a --name that is not a plain name or names something that
      is not a store (checked before anything is embedded), a batch_size <= 0.
    DataError: the task's dataset is not prepared.
  """
  task = retrieval_task(config, task_name)
  if not model:
    raise ConfigError("pass --model: the teacher, a run's workdir or a pretrained model such as 'minilm'")
  if batch_size <= 0:
    raise ConfigError(f"--batch_size must be > 0, got {batch_size}")
  data_dir = paths.resolve_data_dir(config.data.get("data_dir") or None)
  out = teacher_embeddings.check_target(teacher_embeddings.store_dir(data_dir, name, "--name"))
  student = models.resolve(config.model)  # the prefixes and max length the student's batches use
  max_len = int(student.max_text_len)
  prefixes = {"query": student.get("query_prefix", ""), "doc": student.get("doc_prefix", "")}
  records = sources.read_all(task.dataset, data_dir, task.split)
  num_records = len(records)
  embedded = min(task.max_records or num_records, num_records)
  texts = {role: [text_records.as_text(r[task.fields[role]]) for r in records[:embedded]] for role in prefixes}

  encoder = encode.load(model)
  view = _student_view(encoder, max_len, prefixes)
  print(f"Embedding {task.name}: {embedded} of {num_records} records of {task.dataset}/{task.split} (query and "
        f"doc texts, {max_len} tokens), teacher {model}", flush=True)
  t0 = time.perf_counter()
  arrays = {}
  for role in prefixes:
    emb = _embed(view, texts[role], role, batch_size)  # [embedded, D]
    arrays[role] = np.zeros((num_records, emb.shape[1]), np.float32)
    arrays[role][:embedded] = emb
  facts = teacher_embeddings.task_facts(
      dataset=task.dataset, split=task.split, query_field=task.fields["query"], doc_field=task.fields["doc"],
      num_records=num_records, max_text_len=max_len, query_prefix=prefixes["query"], doc_prefix=prefixes["doc"])
  meta = {"command": command, "task": task.name, "model": str(model), "model_step": encoder.step}
  teacher_embeddings.write_teacher_embeddings(out, query=arrays["query"], doc=arrays["doc"], facts=facts,
                                              embedded_records=embedded, meta=meta)
  print(f"Wrote {embedded} x 2 teacher embeddings of dimension {arrays['query'].shape[1]} to {out} in "
        f"{time.perf_counter() - t0:.0f} s. Use them with --config.data.tasks.{task.name}.teacher_embeddings="
        f"{out.name}", flush=True)
  return str(out)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # TFDS is chatty at INFO
  with exit_on_user_error():
    f = {key: holder.value for key, holder in _FLAGS.items()}
    embed_teacher(f["config"], f["task"], f["model"], f["name"], batch_size=f["batch_size"],
                  command=shlex.join(["python", "-m", "big_embed.embed_teacher", *sys.argv[1:]]))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
