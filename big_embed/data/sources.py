"""Prepared datasets by corpus name: their TFDS builders, where they live, and checked random access.

The datasets of a data directory are the registered corpora (`big_embed.data.corpora`) and the datasets found in
it (`found_datasets`: built by `prepare files`, or by the user with TFDS): `corpus(name, data_dir)`,
`entries(kind, data_dir)` and `names(kind, data_dir)` know both. Every failure to find or read a prepared dataset
raises `DataError` naming the dataset, the file and the command that (re)builds it.
"""

from __future__ import annotations

import collections
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from big_embed.data import corpora, found_datasets, paths
from big_embed.data.errors import DataError, prepare_command
from big_embed.errors import ConfigError

FILE_FORMAT = found_datasets.FILE_FORMAT  # the only TFDS format Grain reads without TensorFlow


def entries(kind: str | None = None, data_dir: str | os.PathLike[str] | None = None) -> list[corpora.Corpus]:
  """The registered corpora and the datasets found in `data_dir` (of `kind`, "image" or "text", if given), sorted
  by name."""
  found = found_datasets.find(paths.resolve_data_dir(data_dir)).corpora
  both = {**found, **{c.name: c for c in corpora.entries()}}  # a found dataset never hides a registered one
  return [c for _, c in sorted(both.items()) if kind is None or c.kind == kind]


def names(kind: str | None = None, data_dir: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
  """The names of `entries(kind, data_dir)`."""
  return tuple(c.name for c in entries(kind, data_dir))


def corpus(name: str, data_dir: str | os.PathLike[str] | None) -> corpora.Corpus:
  """The registered corpus or the dataset found in `data_dir` called `name`.

  Raises:
    ConfigError: neither has that name (the message lists the known ones).
    DataError: `<data_dir>/<name>` is there but is not a dataset big_embed can read (the message says why).
  """
  if name in corpora.names():
    return corpora.get(name)
  resolved = paths.resolve_data_dir(data_dir)
  found = found_datasets.find(resolved)
  if name in found.corpora:
    return found.corpora[name]
  if name in found.problems:
    raise DataError(found.problems[name])
  raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(names(None, resolved))} (datasets of your own "
                    f"are found by name in the data dir {resolved} once built: python -m big_embed.data.prepare "
                    f"files --name {name} --train FILE)")


def make_builder(name: str, data_dir: str | os.PathLike[str] | None) -> tfds.core.DatasetBuilder:
  """Returns the TFDS builder of dataset `name` in `data_dir` (a reader for a found dataset).

  Raises:
    ConfigError: no dataset is called `name`.
    DataError: a found dataset is not stored as array_record.
  """
  return corpus(name, data_dir).builder(data_dir=str(paths.resolve_data_dir(data_dir)), file_format=FILE_FORMAT)


def dataset_dir(name: str, data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """Returns `<data_dir>/<builder name>/<version>`, where the finished dataset lives."""
  cls = corpus(name, data_dir).builder
  return paths.resolve_data_dir(data_dir) / cls.name / str(cls.VERSION)


def rebuild_command(name: str, data_dir: str | os.PathLike[str] | None) -> str:
  """What rebuilds dataset `name`: the `prepare` command of a registered corpus or of a `prepare files` dataset."""
  cls = corpus(name, data_dir).builder
  if issubclass(cls, found_datasets.FoundBuilder):
    return f"{cls.command} --overwrite" if cls.command else f"rebuild it with TFDS into {dataset_dir(name, data_dir)}"
  return prepare_command(data_dir, (name,), overwrite=True)


def is_prepared(name: str, data_dir: str | os.PathLike[str] | None) -> bool:
  """Whether dataset `name` is fully built in `data_dir` (TFDS writes dataset_info.json last)."""
  return (dataset_dir(name, data_dir) / "dataset_info.json").is_file()


class CheckedSource:
  """A random-access source (Grain's protocol) that turns read/decode failures into `DataError`.

  Elements are the decoded TFDS feature dicts (numpy arrays; Text as bytes).
  """

  def __init__(self, source: Any, name: str, split: str, directory: pathlib.Path, data_dir: str):
    self._source = source
    self._name, self._split, self._dir, self._data_dir = name, split, directory, data_dir

  def __len__(self) -> int:
    return len(self._source)

  def _error(self, what: str, e: Exception) -> DataError:
    fix = rebuild_command(self._name, self._data_dir)
    return DataError(f"Corrupt {self._name} dataset: cannot read {what} of split {self._split!r} "
                     f"in {self._dir} ({type(e).__name__}: {e}). Rebuild it with: {fix}")

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(f"record {index}", e) from e

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    try:
      return list(self._source.__getitems__(list(indices)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(f"records {min(indices)}..{max(indices)}", e) from e

  def __repr__(self) -> str:
    return f"CheckedSource({self._name}, split={self._split!r}, n={len(self)})"


def build_command(name: str, data_dir: str | os.PathLike[str] | None) -> str:
  """The `prepare` command that builds dataset `name` (the image datasets are built together: they share the
  tokenizer)."""
  image = corpora.names("image")
  return prepare_command(data_dir, image if name in image else (name,))


def _not_prepared(name: str, resolved: str) -> DataError:
  return DataError(f"Dataset {name!r} is not prepared in {resolved} (no {dataset_dir(name, resolved)}). "
                   f"Build it with: {build_command(name, resolved)}")


def _cannot_open(name: str, resolved: str, what: str, e: Exception) -> DataError:
  if isinstance(e, DataError):
    return e
  return DataError(f"Cannot open {what} of dataset {name!r} in {dataset_dir(name, resolved)} "
                   f"({type(e).__name__}: {e}). Rebuild it with: {rebuild_command(name, resolved)}")


def features(name: str, data_dir: str | os.PathLike[str] | None) -> tfds.features.FeaturesDict:
  """The features of prepared dataset `name` as built (ClassLabel names included).

  Raises:
    DataError: the dataset is not prepared in `data_dir` (the message is the `prepare` command).
  """
  resolved = str(paths.resolve_data_dir(data_dir))
  if not is_prepared(name, resolved):
    raise _not_prepared(name, resolved)
  try:
    return make_builder(name, resolved).info.features
  except Exception as e:  # pylint: disable=broad-except
    raise _cannot_open(name, resolved, "the features", e) from e


def open_split(name: str, data_dir: str | os.PathLike[str] | None, split: str) -> CheckedSource:
  """Opens split `split` of prepared dataset `name` for random access.

  Raises:
    DataError: the dataset is not prepared in `data_dir`, has no such split, or its files cannot
      be opened; the message names the dataset, the directory and the `prepare` command.
  """
  resolved = str(paths.resolve_data_dir(data_dir))
  directory = dataset_dir(name, resolved)
  if not is_prepared(name, resolved):
    raise _not_prepared(name, resolved)
  try:
    builder = make_builder(name, resolved)
    splits = list(builder.info.splits.keys())
  except Exception as e:  # pylint: disable=broad-except
    raise _cannot_open(name, resolved, f"split {split!r}", e) from e
  if splits and split.split("[", 1)[0] not in splits:
    raise DataError(f"Dataset {name!r} has no split {split!r}; its splits: {', '.join(splits)}")
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except
    raise _cannot_open(name, resolved, f"split {split!r}", e) from e
  return CheckedSource(source, name, split, directory, resolved)


# Splits read whole by `read_all`, kept while their records add up to at most this many: a run whose tasks and
# evaluations read the same split (Piccolo2 reads WordNet's for two tasks and two evaluations) parses it once.
_CACHED_RECORDS = 500_000
_read_cache: collections.OrderedDict[tuple, list[dict[str, Any]]] = collections.OrderedDict()


def _files_signature(directory: pathlib.Path) -> tuple:
  """(path, size, mtime) of every file of a prepared dataset: a rebuilt or damaged dataset is read again."""
  return tuple(sorted((str(p), st.st_size, st.st_mtime_ns) for p in directory.rglob("*") if p.is_file()
                      for st in (p.stat(),)))


def read_all(name: str, data_dir: str | os.PathLike[str] | None, split: str, chunk: int = 4096
             ) -> list[dict[str, Any]]:
  """Every record of split `split` of prepared dataset `name`, in storage order (read `chunk` at a time).

  The records are shared by every caller in this process (their arrays are read-only) until the dataset's files
  change; a new list is returned each time.

  Raises:
    DataError: as `open_split`, or a record cannot be read.
  """
  resolved = str(paths.resolve_data_dir(data_dir))
  signature = _files_signature(dataset_dir(name, resolved))
  key = (resolved, name, split, signature)
  if key in _read_cache:
    _read_cache.move_to_end(key)
    return list(_read_cache[key])
  source = open_split(name, resolved, split)
  n = len(source)
  getitems = getattr(source, "__getitems__", None)
  if getitems is None:
    return [source[i] for i in range(n)]
  out: list[dict[str, Any]] = []
  for start in range(0, n, chunk):
    out.extend(getitems(range(start, min(n, start + chunk))))
  for record in out:
    for value in record.values():
      if isinstance(value, np.ndarray):
        value.flags.writeable = False
  if signature and n <= _CACHED_RECORDS:
    _read_cache[key] = out
    while sum(len(v) for v in _read_cache.values()) > _CACHED_RECORDS:
      _read_cache.popitem(last=False)
  return list(out)
