"""The mined hard-negative store: sets of mined negatives per query, written by mining and read by retrieval tasks.

A set lives in `<data_dir>/mined/<name>/`: `negatives.npy` int64 [Nq, H] (row i lists record indices of the same
split for record i, -1 = none), `scores.npy` float32 [Nq, H] (the miner's similarities) and `meta.json` (what it was
mined from, and the miner's own facts, e.g. the command). A retrieval task reads one with `mined=<name>,
num_negatives=H`; it must have been mined for the task's dataset, split, query and document fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from big_embed.data import paths
from big_embed.data.errors import DataError

MINED_DIR = "mined"
MINED_FORMAT = "big_embed.mined_negatives"
MINED_VERSION = 1


def mined_dir(data_dir: str | os.PathLike[str] | None, name: str, what: str = "mined set name") -> pathlib.Path:
  """`<data_dir>/mined/<name>`: where the mined hard-negative set `name` lives.

  Raises:
    ConfigError: `name` is not a plain directory name (`paths.check_name`; `what` is how the user gave it).
  """
  return paths.resolve_data_dir(data_dir) / MINED_DIR / paths.check_name(name, what)


def _is_mined_set(directory: pathlib.Path) -> bool:
  """Whether `directory` holds a set `write_mined_negatives` wrote (its meta.json names the format)."""
  try:
    return json.loads((directory / "meta.json").read_text(encoding="utf-8")).get("format") == MINED_FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def check_target(directory: str | os.PathLike[str]) -> pathlib.Path:
  """Returns `directory` (absolute) if `write_mined_negatives` may write there: it is `<store>/mined/<plain name>`
  and holds nothing or a mined set (which is replaced).

  Raises:
    ConfigError: another path, or something other than a mined set is there (a directory without a mined set's
      meta.json, a file, a symbolic link).
  """
  return paths.check_replace_target(directory, MINED_DIR, "a mined hard-negative set", _is_mined_set,
                                    f"meta.json of format {MINED_FORMAT!r}")


@dataclasses.dataclass(frozen=True)
class MinedNegatives:
  """A mined hard-negative set: negatives int64 [Nq, H] (record indices, -1 = none), scores float32 [Nq, H]."""
  negatives: np.ndarray
  scores: np.ndarray
  info: dict  # meta.json: format, version, source_dataset, split, query_field, doc_field, num_records,
  #             num_negatives, meta (the miner's own dict)


def write_mined_negatives(directory: str | os.PathLike[str], *, source_dataset: str, split: str, query_field: str,
                          doc_field: str, negatives: np.ndarray, scores: np.ndarray, meta: dict) -> pathlib.Path:
  """Writes a mined hard-negative set atomically (a temporary sibling directory, then a rename).

  Layout: `negatives.npy` int64 [Nq, H], `scores.npy` float32 [Nq, H], `meta.json`. Row i belongs to record i
  of `split` of `source_dataset` (before any filtering); its entries are record indices of the same split,
  -1 = none. An existing set at `directory` is replaced; anything else there (a directory that is not a mined set,
  a file, a symbolic link) is refused, so that nothing outside the store of mined sets is ever deleted.

  Args:
    directory: `<store>/mined/<name>`, usually `mined_dir(data_dir, name)`.
    source_dataset, split: the dataset CLI name and split the indices refer to (Nq = its record count).
    query_field, doc_field: the record fields the queries and documents were mined with.
    negatives: int [Nq, H]; scores: float [Nq, H] (e.g. the miner's similarities; NaN where -1).
    meta: JSON-serialisable facts about the mining (model, command, ...). A "command" entry is quoted when the
      set no longer matches a task.

  Returns:
    The directory.

  Raises:
    ConfigError: as `check_target`.
    ValueError: bad shapes, dtypes or indices, or `meta` is not JSON-serialisable.
  """
  directory = check_target(directory)
  negatives = np.asarray(negatives)
  scores = np.asarray(scores)
  if negatives.ndim != 2 or negatives.dtype.kind not in "iu":
    raise ValueError(f"negatives must be an integer array [Nq, H], got {negatives.dtype} {negatives.shape}")
  if scores.shape != negatives.shape:
    raise ValueError(f"scores must have the shape of negatives {negatives.shape}, got {scores.shape}")
  if negatives.size and (negatives.min() < -1 or negatives.max() >= negatives.shape[0]):
    raise ValueError(f"negatives must be record indices in [0, {negatives.shape[0]}) or -1, got values in "
                     f"[{negatives.min()}, {negatives.max()}]")
  info = {"format": MINED_FORMAT, "version": MINED_VERSION, "source_dataset": source_dataset, "split": split,
          "query_field": query_field, "doc_field": doc_field, "num_records": int(negatives.shape[0]),
          "num_negatives": int(negatives.shape[1]), "meta": meta}
  try:
    text = json.dumps(info, indent=2)
  except TypeError as e:
    raise ValueError(f"meta must be JSON-serialisable: {e}") from e

  def fill(tmp: pathlib.Path) -> None:
    np.save(tmp / "negatives.npy", negatives.astype(np.int64))
    np.save(tmp / "scores.npy", scores.astype(np.float32))
    (tmp / "meta.json").write_text(text, encoding="utf-8")

  return paths.replace_directory(directory, fill)


def read_mined_negatives(directory: str | os.PathLike[str]) -> MinedNegatives:
  """Reads a set written by `write_mined_negatives`.

  Raises:
    DataError: the set is missing, incomplete or corrupt.
  """
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.is_file():
    raise DataError(f"No mined hard-negative set in {directory} (no meta.json); mine it first with the "
                    "hard-negative mining command, or set the task's num_negatives=0 and mined=''")
  try:
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    negatives = np.load(directory / "negatives.npy", allow_pickle=False)
    scores = np.load(directory / "scores.npy", allow_pickle=False)
  except (OSError, ValueError) as e:
    raise DataError(f"Corrupt mined hard-negative set {directory} ({type(e).__name__}: {e}); mine it again") from e
  if info.get("format") != MINED_FORMAT or info.get("version") != MINED_VERSION:
    raise DataError(f"{meta_path} is not a {MINED_FORMAT} v{MINED_VERSION} set (format={info.get('format')!r}, "
                    f"version={info.get('version')!r}); mine it again")
  if negatives.shape != (info["num_records"], info["num_negatives"]) or scores.shape != negatives.shape:
    raise DataError(f"Corrupt mined hard-negative set {directory}: negatives {negatives.shape}, scores "
                    f"{scores.shape}, meta.json says ({info['num_records']}, {info['num_negatives']}); "
                    "mine it again")
  return MinedNegatives(negatives.astype(np.int64), scores.astype(np.float32), info)
