"""The teacher-embedding store: a frozen teacher's embeddings of a retrieval task's texts, written once by
`python -m big_embed.embed_teacher` and read by the task's batches (`teacher_embeddings=<name>`) instead of running
the teacher inside the train step.

A store lives in `<data_dir>/teacher_embeddings/<name>/`: `query.npy` and `doc.npy` float32 [N, D] (row i: the
teacher's unit embedding of record i's query / document text of the split, zeros for a record with an empty field
or beyond the embedded records) and `info.json`: the facts of the texts it was embedded from (`task_facts`: dataset,
split, fields, num_records, max_text_len, prefixes), `embedded_records` (its first rows that were embedded), `dim`,
and the embedder's own facts (model, command). A task reads it only if the facts are the task's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from big_embed.data import paths
from big_embed.data.errors import DataError

STORE_DIR = "teacher_embeddings"
FORMAT = "big_embed.teacher_embeddings"
VERSION = 1
ARRAYS = ("query", "doc")


def store_dir(data_dir: str | os.PathLike[str] | None, name: str, what: str = "teacher embeddings name"
              ) -> pathlib.Path:
  """`<data_dir>/teacher_embeddings/<name>`.

  Raises:
    ConfigError: `name` is not a plain directory name (`paths.check_name`; `what` is how the user gave it).
  """
  return paths.resolve_data_dir(data_dir) / STORE_DIR / paths.check_name(name, what)


def task_facts(*, dataset: str, split: str, query_field: str, doc_field: str, num_records: int, max_text_len: int,
               query_prefix: str, doc_prefix: str) -> dict:
  """What a store's texts were made of; a task reads a store only if these are its own."""
  return {"dataset": dataset, "split": split, "fields": {"query": query_field, "doc": doc_field},
          "num_records": int(num_records), "max_text_len": int(max_text_len),
          "prefixes": {"query": query_prefix, "doc": doc_prefix}}


def _read_info(directory: pathlib.Path) -> dict | None:
  try:
    info = json.loads((directory / "info.json").read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def check_target(directory: str | os.PathLike[str]) -> pathlib.Path:
  """Returns `directory` (absolute) if `write_teacher_embeddings` may write there: `<store>/teacher_embeddings/
  <plain name>`, holding nothing or a store (which is replaced).

  Raises:
    ConfigError: another path, or something other than a store is there (a directory without a store's
      info.json, a file, a symbolic link).
  """
  return paths.check_replace_target(directory, STORE_DIR, "a teacher-embedding store",
                                    lambda d: _read_info(d) is not None, f"info.json of format {FORMAT!r}")


def write_teacher_embeddings(directory: str | os.PathLike[str], *, query: np.ndarray, doc: np.ndarray, facts: dict,
                             embedded_records: int, meta: dict) -> pathlib.Path:
  """Writes a store atomically (a temporary sibling directory, then a rename); an existing store there is
  replaced, anything else refused (`check_target`), so nothing outside the store is ever deleted.

  Args:
    directory: usually `store_dir(data_dir, name)`.
    query, doc: float [N, D], N = facts["num_records"]: row i embeds record i of the split.
    facts: `task_facts(...)` of the texts embedded.
    embedded_records: the first rows that hold embeddings (the rest are zeros).
    meta: JSON-serialisable facts of the embedding (model, command, ...); its "command" is quoted when the store
      no longer matches a task.

  Raises:
    ConfigError: as `check_target`.
    ValueError: bad shapes, or `meta` is not JSON-serialisable.
  """
  directory = check_target(directory)
  query, doc = np.asarray(query, np.float32), np.asarray(doc, np.float32)
  if query.ndim != 2 or doc.shape != query.shape or len(query) != facts["num_records"]:
    raise ValueError(f"query and doc must both be [num_records={facts['num_records']}, D], got {query.shape} and "
                     f"{doc.shape}")
  if not 0 <= embedded_records <= len(query):
    raise ValueError(f"embedded_records must be in [0, {len(query)}], got {embedded_records}")
  info = {"format": FORMAT, "version": VERSION, **facts, "embedded_records": int(embedded_records),
          "dim": int(query.shape[1]), "meta": meta}
  try:
    text = json.dumps(info, indent=2)
  except TypeError as e:
    raise ValueError(f"meta must be JSON-serialisable: {e}") from e

  def fill(tmp: pathlib.Path) -> None:
    np.save(tmp / "query.npy", query)
    np.save(tmp / "doc.npy", doc)
    (tmp / "info.json").write_text(text, encoding="utf-8")

  return paths.replace_directory(directory, fill)


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherEmbeddings:
  """A store, its arrays memory-mapped: query, doc float32 [N, D] (rows gathered by record index)."""
  directory: pathlib.Path
  query: np.ndarray
  doc: np.ndarray
  info: dict  # info.json

  def __reduce__(self):  # pickled (e.g. to a data worker) as its directory: the arrays are mapped again there
    return read_teacher_embeddings, (self.directory,)


def read_teacher_embeddings(directory: str | os.PathLike[str]) -> TeacherEmbeddings:
  """Opens a store written by `write_teacher_embeddings` (the arrays memory-mapped, read-only).

  Raises:
    DataError: missing, incomplete or corrupt.
  """
  directory = pathlib.Path(directory)
  if not (directory / "info.json").is_file():
    raise DataError(f"No teacher embeddings in {directory} (no info.json); embed them first with python -m "
                    "big_embed.embed_teacher")
  info = _read_info(directory)
  if info is None or info.get("version") != VERSION:
    raise DataError(f"{directory / 'info.json'} is not a {FORMAT} v{VERSION} store; embed it again")
  try:
    arrays = [np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS]
  except (OSError, ValueError) as e:
    raise DataError(f"Corrupt teacher embeddings {directory} ({type(e).__name__}: {e}); embed them again") from e
  want = (info.get("num_records"), info.get("dim"))
  if any(a.shape != want or a.dtype != np.float32 for a in arrays):
    raise DataError(f"Corrupt teacher embeddings {directory}: query {arrays[0].dtype} {arrays[0].shape}, doc "
                    f"{arrays[1].dtype} {arrays[1].shape}, info.json says float32 {want}; embed them again")
  return TeacherEmbeddings(directory, *arrays, info)


def read_for_task(name: str, data_dir: str | os.PathLike[str] | None, facts: dict, rows_needed: int,
                  task: str) -> TeacherEmbeddings:
  """The store `name` of retrieval task `task`, checked to hold `facts` (`task_facts`) and embeddings for the
  first `rows_needed` records (every row the task's batches gather: its records and its mined negatives).

  Raises:
    DataError: missing, corrupt, or made of other texts or too few records; the message names what differs and
      the command that rebuilds it.
  """
  directory = store_dir(data_dir, name, f"config.data.tasks.{task}.teacher_embeddings")
  rebuild = (f"python -m big_embed.embed_teacher --config <this recipe> --task {task} --model <the teacher> "
             f"--name {name}")
  if not (directory / "info.json").is_file():
    raise DataError(f"No teacher embeddings {name!r} in {directory.parent}; embed them first: {rebuild} (or set "
                    f"config.data.tasks.{task}.teacher_embeddings='')")
  store = read_teacher_embeddings(directory)
  info = store.info
  wrong = {k: (info.get(k), v) for k, v in facts.items() if info.get(k) != v}
  if not wrong and info.get("embedded_records", 0) < rows_needed:
    wrong = {"embedded_records": (info.get("embedded_records"), f">= {rows_needed}")}
  if wrong:
    how = info.get("meta", {}).get("command") if isinstance(info.get("meta"), dict) else None
    raise DataError(f"Teacher embeddings {directory} do not match task {task!r}: "
                    + ", ".join(f"{k} is {have!r}, the task needs {need!r}" for k, (have, need) in wrong.items())
                    + f". Embed them again for this recipe: {rebuild}" + (f" (they were made with: {how})" if how
                                                                         else ""))
  return store
