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

from big_embed.data import (bible, captions, debian, debian_packages, emoji, fashion_mnist, foldoc,
                            fortunes, paths, similarity_sets, sources, tokenizer, wordnet)
from big_embed.data.errors import DataError

# Debian packages holding each dataset's raw sources (installed before the build when root).
_PACKAGES = {
    "emoji": emoji.DEBIAN_PACKAGES,
    "fashion_mnist": fashion_mnist.DEBIAN_PACKAGES,
    "bible": bible.DEBIAN_PACKAGES,
    "wordnet": wordnet.DEBIAN_PACKAGES,
    "debian_packages": debian_packages.DEBIAN_PACKAGES,
    "fortunes": fortunes.DEBIAN_PACKAGES,
    "foldoc": foldoc.DEBIAN_PACKAGES,
    "lee50": similarity_sets.DEBIAN_PACKAGES,
    "wordsim353": similarity_sets.DEBIAN_PACKAGES,
    "simlex999": similarity_sets.DEBIAN_PACKAGES,
}


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
  for package in _PACKAGES[name]:
    debian.ensure_package(package)
  # A previous build (or an interrupted one: TFDS writes into `incomplete.*` first) is removed.
  for stale in [target, *target.parent.glob(f"incomplete.*_{target.name}")]:
    if stale.exists():
      print(f"{name}: removing {stale}", flush=True)
      shutil.rmtree(stale)
  start = time.perf_counter()
  data_dir.mkdir(parents=True, exist_ok=True)
  builder = sources.make_builder(name, data_dir)
  with tempfile.TemporaryDirectory(prefix="big_embed_downloads_") as downloads:
    builder.download_and_prepare(
        download_dir=downloads,
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  skips = getattr(builder, "skip_counts", None)  # Text corpora count the records they drop.
  if skips is not None:
    print(skips.message(name), flush=True)
  counts = {split: len(sources.open_split(name, data_dir, split))
            for split in sources.make_builder(name, data_dir).info.splits}
  print(f"{name}: built {counts} in {time.perf_counter() - start:.1f} s -> {target}", flush=True)
  return True


def _training_texts(data_dir: pathlib.Path) -> Iterator[str]:
  """Every caption (or a text covering its words) the training pipeline can produce."""
  if sources.is_prepared("fashion_mnist", data_dir):
    yield from captions.all_fashion_captions()
  if sources.is_prepared("emoji", data_dir):
    records = sources.open_split("emoji", data_dir, "train")
    entries = ((r["name"].decode(), [k.decode() for k in r["keywords"]])
               for r in records.__getitems__(range(len(records))))
    yield from captions.all_emoji_caption_texts(entries)


def build_tokenizer(data_dir: str | os.PathLike[str] | None,
                    vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Trains the tokenizer on the prepared datasets' training captions; returns its path."""
  data_dir = paths.resolve_data_dir(data_dir)
  tok = tokenizer.train_tokenizer(_training_texts(data_dir), vocab_size=vocab_size)
  path = paths.tokenizer_path(data_dir)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tok.save(tmp)
  os.replace(tmp, path)  # Readers never see a partial file.
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
    ValueError: an unknown dataset name.
    DataError: a source package is missing and cannot be installed.
  """
  unknown = [n for n in names if n not in sources.DATASETS]
  if unknown:
    raise ValueError(f"Unknown dataset(s) {unknown}; known: {', '.join(sources.DATASETS)}")
  data_dir = paths.resolve_data_dir(data_dir)
  built = {name: prepare_dataset(name, data_dir, overwrite=overwrite) for name in names}
  # The tokenizer is trained on image captions only: text corpora alone neither need nor change it.
  has_captions = any(sources.is_prepared(n, data_dir) for n in sources.IMAGE_DATASETS)
  built_captions = any(built[n] for n in built if n in sources.IMAGE_DATASETS)
  if has_captions and (built_captions or not _tokenizer_ok(data_dir)):
    build_tokenizer(data_dir, vocab_size)
  return data_dir
