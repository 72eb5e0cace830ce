r"""Hard-negative mining: embed a retrieval task's corpus, retrieve top-k per query, filter false negatives.

    python -m big_embed.mine --config configs/text_retrieval.py --task bible \
        [--model minilm | --model runs/text_retrieval] [--name bible_minilm] [--top_k 50] [--num_negatives 7] \
        [--margin_abs 0.95] [--margin_rel 0.95]

For each query of the task's split (`config.data.tasks[task]`: dataset, split, query and doc fields):
1. every distinct document text of the split and every query are embedded with `--model` (a run's workdir or
   a pretrained model; default: the recipe's `config.model.pretrained`), with the model's query / doc prefixes;
2. the top `--top_k` documents by cosine are found exactly, in batches on the device (`lax.top_k` over
   `[batch, N]` similarity blocks);
3. candidates are dropped if they are the query's own document (same text), if their similarity is at least
   `--margin_abs` (near-duplicates), or above `--margin_rel` times the positive's similarity (likely
   unlabelled positives: the "TopK-PercPos" filter of NV-Retriever, arXiv 2407.15831);
4. the first `--num_negatives` survivors, in rank order, are written (as record indices of the split, -1 where
   fewer survive) to `<data_dir>/mined/<name>/`, which a task reads with `mined=<name>, num_negatives=H`.
"""

from __future__ import annotations

import functools
import pathlib
import shlex
import sys
import time
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from big_embed import encode
from big_embed.data import mined_negatives
from big_embed.data import paths
from big_embed.data import sources
from big_embed.data import text_records
from big_embed.data import text_tasks
from big_embed.errors import ConfigError, exit_on_user_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe whose task is mined.", lock_config=True)
_TASK = flags.DEFINE_string("task", "", "Retrieval task name in config.data.tasks (default: the only one).")
_MODEL = flags.DEFINE_string("model", "", "A run's workdir, 'minilm' or a HF BERT directory "
                             "(default: config.model.pretrained).")
_NAME = flags.DEFINE_string("name", "", "Name of the mined set (default: <task>_<model>).")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Candidates retrieved per query.")
_NUM_NEGATIVES = flags.DEFINE_integer("num_negatives", 7, "Negatives kept per query.")
_MARGIN_ABS = flags.DEFINE_float("margin_abs", 0.95, "Drop candidates with cosine >= this (near-duplicates).")
_MARGIN_REL = flags.DEFINE_float("margin_rel", 0.95, "Drop candidates with cosine > this x the positive's cosine.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Texts per encoding batch and queries per search block.")
flags.mark_flags_as_required(["config"])


@functools.partial(jax.jit, static_argnames="k")
def _top_k(queries, corpus, k: int):
  """queries [b, D], corpus [N, D] (unit norm) -> (cosines [b, k], doc indices [b, k]), best first."""
  return jax.lax.top_k(queries @ corpus.T, k)


def exact_top_k(queries: np.ndarray, corpus: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k documents per query by cosine, `block` queries at a time on the device."""
  k = min(k, len(corpus))
  corpus_dev = jnp.asarray(corpus, jnp.float32)
  scores, index = [], []
  for start in range(0, len(queries), block):
    q = queries[start:start + block]
    if len(q) < block and len(queries) > block:  # keep one compiled shape
      q = np.concatenate([q, np.zeros((block - len(q), q.shape[1]), q.dtype)])
    s, i = _top_k(jnp.asarray(q, jnp.float32), corpus_dev, k)
    n = min(block, len(queries) - start)
    scores.append(np.asarray(s)[:n])
    index.append(np.asarray(i)[:n])
  return np.concatenate(scores), np.concatenate(index)


def filter_negatives(cand_scores: np.ndarray, cand_docs: np.ndarray, positive_doc: np.ndarray,
                     positive_score: np.ndarray, *, num_negatives: int, margin_abs: float, margin_rel: float
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
  """Keeps, per query, the first `num_negatives` candidates that are not false negatives.

  Args:
    cand_scores, cand_docs: [Q, K] retrieved cosines and document indices, best first.
    positive_doc: [Q] the query's own document index; positive_score: [Q] its cosine.
  Returns:
    (negatives [Q, H] doc indices, -1 = none; their cosines [Q, H] (0 where none); counts of dropped candidates).
  """
  q_count = len(cand_docs)
  is_positive = cand_docs == positive_doc[:, None]
  too_close = cand_scores >= margin_abs
  too_rel = cand_scores > margin_rel * positive_score[:, None]
  keep = ~(is_positive | too_close | too_rel)
  negatives = np.full((q_count, num_negatives), -1, np.int64)
  scores = np.zeros((q_count, num_negatives), np.float32)
  for row in range(q_count):
    docs = cand_docs[row][keep[row]][:num_negatives]
    negatives[row, :len(docs)] = docs
    scores[row, :len(docs)] = cand_scores[row][keep[row]][:num_negatives]
  stats = {"positive": int(is_positive.sum()), "margin_abs": int((too_close & ~is_positive).sum()),
           "margin_rel": int((too_rel & ~too_close & ~is_positive).sum()),
           "short_rows": int((negatives[:, -1] < 0).sum())}
  return negatives, scores, stats


def mine(config, task_name: str, model: str, name: str, *, top_k: int, num_negatives: int, margin_abs: float,
         margin_rel: float, batch_size: int, command: str = "") -> str:
  """Mines hard negatives for retrieval task `task_name` of `config`; returns the output directory.

  `command` (the command line that reruns this mining) is recorded in the set's meta.json.
  """
  tasks = text_tasks.resolve_tasks(config.data, config.train.batch_size) if config.data.get("tasks") else {}
  retrieval = [n for n, t in tasks.items() if t.type == "retrieval"]
  if not task_name:
    if len(retrieval) != 1:
      raise ConfigError(f"pass --task: config.data.tasks has retrieval tasks {retrieval}")
    task_name = retrieval[0]
  if task_name not in retrieval:
    raise ConfigError(f"--task={task_name!r} is not a retrieval task of config.data.tasks; retrieval tasks: "
                      f"{retrieval}")
  if num_negatives <= 0 or top_k < num_negatives:
    raise ConfigError(f"need 0 < --num_negatives <= --top_k, got {num_negatives} and {top_k}")
  task = tasks[task_name]
  model = model or config.model.get("pretrained", "")
  if not model:
    raise ConfigError("pass --model (a run's workdir or 'minilm'): config.model.pretrained is empty")
  data_dir = paths.resolve_data_dir(config.data.get("data_dir") or None)
  # Checked before anything is read or embedded: the name becomes <data_dir>/mined/<name>.
  default_name = f"{task_name}_{pathlib.Path(str(model)).expanduser().name or 'model'}"
  out = mined_negatives.check_target(mined_negatives.mined_dir(
      data_dir, name or default_name, "--name" if name else "the default --name <task>_<model> (pass --name)"))
  name = out.name
  records = sources.read_all(task.dataset, data_dir, task.split)
  num_records = len(records)
  if task.max_records:  # the task's subset: its first max_records records
    records = records[:task.max_records]
  query_field, doc_field = task.fields["query"], task.fields["doc"]
  queries = [text_records.as_text(r[query_field]) for r in records]
  docs = [text_records.as_text(r[doc_field]) for r in records]
  distinct = {}
  for i, d in enumerate(docs):
    distinct.setdefault(d, i)  # distinct doc text -> its first record index
  corpus_records = np.fromiter(distinct.values(), np.int64, len(distinct))
  doc_slot = {d: j for j, d in enumerate(distinct)}
  positive = np.array([doc_slot[d] for d in docs], np.int64)  # [Q] index into the distinct corpus

  encoder = encode.load(model)
  print(f"Mining {task_name}: {len(queries)} queries, {len(distinct)} distinct documents of "
        f"{task.dataset}/{task.split}, model {model}", flush=True)
  t0 = time.perf_counter()
  q_emb = encoder.encode_queries(queries, batch_size=batch_size)  # [Q, D]
  d_emb = encoder.encode_corpus(list(distinct), batch_size=batch_size)  # [N, D]
  cand_scores, cand_docs = exact_top_k(q_emb, d_emb, top_k + 1, block=batch_size)
  positive_score = np.einsum("qd,qd->q", q_emb, d_emb[positive])
  neg, neg_scores, stats = filter_negatives(cand_scores, cand_docs, positive, positive_score,
                                            num_negatives=num_negatives, margin_abs=margin_abs,
                                            margin_rel=margin_rel)
  neg_records = np.full((num_records, num_negatives), -1, np.int64)  # rows beyond a max_records subset: none
  neg_records[:len(neg)] = np.where(neg >= 0, corpus_records[np.maximum(neg, 0)], -1)
  padded_scores = np.zeros((num_records, num_negatives), np.float32)
  padded_scores[:len(neg)] = neg_scores
  meta = {"command": command, "task": task_name, "model": str(model), "model_step": encoder.step,
          "top_k": top_k, "num_negatives": num_negatives, "margin_abs": margin_abs, "margin_rel": margin_rel,
          "dropped": stats, "positive_rank1": float(np.mean(cand_docs[:, 0] == positive))}
  mined_negatives.write_mined_negatives(out, source_dataset=task.dataset, split=task.split,
                                        query_field=query_field, doc_field=doc_field, negatives=neg_records,
                                        scores=padded_scores, meta=meta)
  print(f"Wrote {len(queries)} x {num_negatives} negatives to {out} in {time.perf_counter() - t0:.0f} s "
        f"(dropped: {stats}; rows with fewer than {num_negatives}: {stats['short_rows']}). Use it with "
        f"--config.data.tasks.{task_name}.mined={name} --config.data.tasks.{task_name}.num_negatives="
        f"{num_negatives}", flush=True)
  return str(out)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.ERROR)  # TFDS is chatty at INFO
  with exit_on_user_error():
    mine(_CONFIG.value, _TASK.value, _MODEL.value, _NAME.value, top_k=_TOP_K.value,
         num_negatives=_NUM_NEGATIVES.value, margin_abs=_MARGIN_ABS.value, margin_rel=_MARGIN_REL.value,
         batch_size=_BATCH_SIZE.value, command=shlex.join(["python", "-m", "big_embed.mine", *sys.argv[1:]]))


if __name__ == "__main__":
  app.run(main)
