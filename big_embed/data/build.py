"""Builds datasets (TFDS, array_record) and the text tokenizer into a data directory.

`prepare(names, data_dir)` is what the `big_embed.data.prepare` CLI runs; tests call it directly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from big_embed.data import corpora, debian, paths, sources, tokenizer
from big_embed.data.errors import DataError


def prepare_dataset(name: str, data_dir: str | os.PathLike[str] | None, *,
                    overwrite: bool = False) -> bool:
  """Builds dataset `name` into `data_dir`; returns False if it was already built (and kept).

  Raises:
    DataError: a Debian source package is missing and cannot be installed.
  """
  data_dir = paths.resolve_data_dir(data_dir)
  target = sources.dataset_dir(name, data_dir)
  if sources.is_prepared(name, data_dir) and not overwrite:
    print(f"{name}: already built in {target}; skipping (pass --overwrite to rebuild).", flush=True)
    return False
  for package in corpora.get(name).debian_packages:
    debian.ensure_package(package)
  start = time.perf_counter()
  builder = sources.make_builder(name, data_dir)
  write_dataset(name, builder, target)
  skips = getattr(builder, "skip_counts", None)  # Text corpora count the records they drop.
  if skips is not None:
    print(skips.message(name), flush=True)
  counts = {split: len(sources.open_split(name, data_dir, split))
            for split in sources.make_builder(name, data_dir).info.splits}
  print(f"{name}: built {counts} in {time.perf_counter() - start:.1f} s -> {target}", flush=True)
  return True


def write_dataset(name: str, builder: tfds.core.GeneratorBasedBuilder, target: pathlib.Path) -> None:
  """Writes `builder`'s dataset (array_record, no statistics) into `target`, its `<data_dir>/<name>/<version>`,
  after removing a previous build there (or an interrupted one: TFDS writes into `incomplete.*` first).

  Raises:
    ConfigError: `name` is not a plain directory name, or a previous build to remove is a symbolic link or
      resolves outside `<data_dir>` (nothing is removed then). TFDS never fetches from its GCS mirror here.
  """
  paths.check_name(target.parent.name, "the dataset name")
  for stale in [target, *target.parent.glob(f"incomplete.*_{target.name}")]:
    if stale.exists() or stale.is_symlink():
      paths.check_inside(stale, target.parent.parent, f"the previous build of {name}")
      print(f"{name}: removing {stale}", flush=True)
      shutil.rmtree(stale)
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="big_embed_downloads_") as downloads:
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False))


def _training_texts(data_dir: pathlib.Path) -> Iterator[str]:
  """Every caption (or a text covering its words) the image-text training stream can produce, over the prepared
  image datasets (the bundled corpora and those found in `data_dir`)."""
  for corpus in sources.entries("image", data_dir):
    if sources.is_prepared(corpus.name, data_dir):
      yield from corpus.image_text.caption_texts(
          lambda split, name=corpus.name: sources.read_all(name, data_dir, split))


def build_tokenizer(data_dir: str | os.PathLike[str] | None,
                    vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Trains the tokenizer on the prepared datasets' training captions; returns its path."""
  data_dir = paths.resolve_data_dir(data_dir)
  tok = tokenizer.train_tokenizer(_training_texts(data_dir), vocab_size=vocab_size)
  path = tokenizer.save_atomically(tok, paths.tokenizer_path(data_dir))
  print(f"tokenizer: vocabulary of {tok.vocab_size} -> {path}", flush=True)
  return path


def _tokenizer_ok(data_dir: pathlib.Path) -> bool:
  try:
    tokenizer.load_tokenizer(data_dir)
    return True
  except DataError:
    return False


def prepare(names: Sequence[str], data_dir: str | os.PathLike[str] | None = None, *,
            overwrite: bool = False, vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Builds datasets `names` (skipping finished ones unless `overwrite`) and the tokenizer.

  The tokenizer is (re)trained on the image datasets' captions when one of them was built, or when
  it is missing or unreadable while one of them is prepared.

  Returns:
    The resolved data directory.

  Raises:
    ConfigError: an unknown dataset name.
    DataError: a source package is missing and cannot be installed.
  """
  for name in names:
    corpora.get(name)  # Unknown names fail before anything is built.
  data_dir = paths.resolve_data_dir(data_dir)
  built = {name: prepare_dataset(name, data_dir, overwrite=overwrite) for name in names}
  # The tokenizer is trained on image captions only: text corpora alone neither need nor change it.
  image = sources.names("image", data_dir)
  has_captions = any(sources.is_prepared(n, data_dir) for n in image)
  built_captions = any(built[n] for n in built if n in image)
  if has_captions and (built_captions or not _tokenizer_ok(data_dir)):
    build_tokenizer(data_dir, vocab_size)
  return data_dir
