"""`python -m big_embed.data.prepare files`: a TFDS array_record dataset built from your own files.

    prepare_files("mydocs", "pairs.jsonl", data_dir="/data")  # -> /data/mydocs/1.0.0/, /data/mydocs/tokenizer.json

The records are read and checked by `own_files` (formats, roles, what is skipped); the test split is the `test`
file's records, or else those whose id (else query) hashes below `test_percent` (`own_files.split_by_id`). The
dataset is written to `<data_dir>/<name>/1.0.0/`, where `found_datasets` finds it by name, with one feature per
role of the files:

  query, positive, caption, id  Text          (id: "" where a record has none)
  negatives                     Sequence(Text)
  score                         Scalar float32
  label                         ClassLabel, its names the distinct labels of both splits, sorted
  labels                        Sequence(ClassLabel), likewise
  image                         Image uint8 [image_size, image_size, 3] (PNG)

Tokenizer: a text dataset gets its own, trained on its training texts (queries, positives, negatives and label
names), in `<data_dir>/<name>/tokenizer.json`; a text model reads it with `config.model.tokenizer = "<name>"`.
An image-text dataset's training captions join the shared `<data_dir>/tokenizer.json` of the image datasets, which
is retrained on all of them.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from big_embed.data import build, corpora, found_datasets, own_files, paths, sources, text_records, tokenizer
from big_embed.data.errors import DataError
from big_embed.errors import ConfigError

DATASET_VERSION = "1.0.0"
DEFAULT_TEST_PERCENT = 10
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def features(roles: tuple[str, ...], label_names: list[str], labels_names: list[str], image_size: int
             ) -> tfds.features.FeaturesDict:
  """The TFDS features of a dataset with these roles (module docstring)."""
  t = tfds.features
  kinds = {"query": t.Text(), "positive": t.Text(), "caption": t.Text(), "id": t.Text(),
           "negatives": t.Sequence(t.Text()), "score": t.Scalar(dtype=np.float32)}
  if "label" in roles:
    kinds["label"] = t.ClassLabel(names=label_names)
  if "labels" in roles:
    kinds["labels"] = t.Sequence(t.ClassLabel(names=labels_names))
  if "image" in roles:
    kinds["image"] = t.Image(shape=(image_size, image_size, 3))
  return t.FeaturesDict({role: kinds[role] for role in roles})


def _example(record: dict[str, Any], roles: tuple[str, ...]) -> dict[str, Any]:
  defaults = {"id": "", "negatives": []}
  out = {role: record.get(role, defaults.get(role)) for role in roles}
  if "image" in out:
    out["image"] = Image.fromarray(out["image"])
  return out


class OwnDataBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The TFDS builder of one dataset of your own; `make_builder` makes its class (name, records, features)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Built from local files with `python -m big_embed.data.prepare files`."}
  splits_records: dict[str, list[dict[str, Any]]] = {}
  roles: tuple[str, ...] = ()
  features_dict: tfds.features.FeaturesDict | None = None
  command = ""
  sources_text = ""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"Built from {self.sources_text} by big_embed.", features=self.features_dict,
        metadata=tfds.core.MetadataDict({"command": self.command, "roles": list(self.roles)}))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(records) for split, records in self.splits_records.items()}

  def _generate_examples(self, records) -> Iterator[tuple[int, dict[str, Any]]]:
    for i, record in enumerate(records):
      yield i, _example(record, self.roles)


def make_builder(name: str, splits: dict[str, list[dict[str, Any]]], roles: tuple[str, ...], image_size: int,
                 command: str, sources_text: str, data_dir: pathlib.Path) -> OwnDataBuilder:
  """The builder of dataset `name` writing `splits` (split -> checked records) into `data_dir`."""
  records = [r for split in splits.values() for r in split]
  label_names = sorted({r["label"] for r in records if "label" in r})
  labels_names = sorted({n for r in records for n in r.get("labels", ())})
  cls = type(f"OwnData_{name}", (OwnDataBuilder,), {
      "name": name, "splits_records": splits, "roles": roles, "command": command, "sources_text": sources_text,
      "features_dict": features(roles, label_names, labels_names, image_size)}, skip_registration=True)
  return cls(data_dir=str(data_dir), file_format=found_datasets.FILE_FORMAT)


def _check_flags(name: str, data_dir: pathlib.Path, test_percent: int, image_size: int) -> None:
  paths.check_name(name, "--name")  # the dataset's directory <data_dir>/<name>
  if not _NAME.fullmatch(name):
    raise ConfigError(f"--name={name!r} must be a lower-case identifier (letters, digits, _; e.g. my_docs): it is "
                      "the dataset's directory and its name in configs")
  reserved = {found_datasets.MINED_DIR, *corpora.names(), *(c.builder.name for c in corpora.entries())}
  if name in reserved:
    raise ConfigError(f"--name={name!r} is taken by a bundled dataset (or the mined sets); pick another name")
  if not 0 < test_percent < 100:
    raise ConfigError(f"--test_percent={test_percent} must be in 1..99 (the share of records held out for test)")
  if not 8 <= image_size <= 4096:
    raise ConfigError(f"--image_size={image_size} must be in 8..4096 pixels")
  existing = found_datasets.find(data_dir).corpora.get(name)
  if existing is not None and not existing.builder.command:
    raise ConfigError(f"{data_dir / name} holds a dataset that `prepare files` did not build; pick another --name")


def _command(name: str, train: pathlib.Path, test: pathlib.Path | None, data_dir: pathlib.Path, test_percent: int,
             image_size: int, fields: Mapping[str, str]) -> str:
  cmd = ["python", "-m", "big_embed.data.prepare", "files", f"--name={name}", f"--train={train}"]
  cmd += [f"--test={test}"] if test else [f"--test_percent={test_percent}"]
  cmd += [f"--data_dir={data_dir}", f"--image_size={image_size}"]
  if fields:
    cmd.append("--fields=" + ",".join(f"{k}={v}" for k, v in fields.items()))
  return shlex.join(cmd)


def _read_test(test: own_files.OwnFile, train: own_files.OwnFile) -> list[dict[str, Any]]:
  if test.kind != train.kind:
    raise DataError(f"{test.path} is {test.kind} data but {train.path} is {train.kind} data; give files of one kind")
  lacking = [r for r in train.roles if r not in test.roles and r not in own_files.OPTIONAL_ROLES]
  if lacking:
    raise DataError(f"{test.path} lacks the role(s) {lacking} of {train.path}; give test records the same fields")
  return test.records


def _training_texts(records: list[dict[str, Any]]) -> Iterator[str]:
  """Every text a text task can read from the training records: queries, positives, negatives, label texts."""
  for r in records:
    yield from (r[role] for role in ("query", "positive") if role in r)
    yield from r.get("negatives", ())
    yield from (text_records.humanize_label(n) for n in ([r["label"]] if "label" in r else []) + r.get("labels", []))


def prepare_files(name: str, train: str | os.PathLike[str], test: str | os.PathLike[str] | None = None,
                  data_dir: str | os.PathLike[str] | None = None, *, test_percent: int = DEFAULT_TEST_PERCENT,
                  image_size: int = own_files.DEFAULT_IMAGE_SIZE, fields: Mapping[str, str] | None = None,
                  overwrite: bool = False, vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE) -> pathlib.Path:
  """Builds dataset `name` from the file `train` (and `test`) into `data_dir`, and its tokenizer.

  Args:
    name: the dataset's name (a lower-case identifier, not a bundled dataset's).
    train, test: .jsonl / .tsv / .csv files (`own_files`); without `test`, the hash split holds out about
      `test_percent`% of the records.
    data_dir: the data directory (None: $BIG_EMBED_DATA_DIR, else the default).
    image_size: the side of the stored images (image-text data).
    fields: field name -> role, for fields not named like their role.
    overwrite: rebuild a dataset that is already built (else it is kept).
    vocab_size: the tokenizer's maximum vocabulary.

  Returns:
    The resolved data directory.

  Raises:
    ConfigError: a bad name, test_percent, image_size or fields.
    DataError: a file is missing, unreadable or has no usable record; the files differ in kind or roles; the hash
      split leaves a split empty.
  """
  data_dir = paths.resolve_data_dir(data_dir)
  _check_flags(name, data_dir, test_percent, image_size)
  target = data_dir / name / DATASET_VERSION
  if (target / found_datasets.INFO_FILE).is_file() and not overwrite:
    print(f"{name}: already built in {target}; skipping (pass --overwrite to rebuild).", flush=True)
    return data_dir
  start = time.perf_counter()
  train_path = pathlib.Path(train).expanduser().absolute()
  test_path = pathlib.Path(test).expanduser().absolute() if test else None
  read = own_files.read_file(train_path, fields=fields, image_size=image_size)
  files = [read]
  if test_path is not None:
    held_out = own_files.read_file(test_path, fields=fields, image_size=image_size)
    files.append(held_out)
    splits = {"train": read.records, "test": _read_test(held_out, read)}
  else:
    splits = own_files.split_by_id(read.records, test_percent)
    empty = [s for s, records in splits.items() if not records]
    if empty:
      raise DataError(f"{train_path}: the hash split leaves {empty[0]} empty ({len(read.records)} usable records, "
                      f"--test_percent={test_percent}); give more records, another --test_percent, or --test FILE")
  roles = tuple(r for r in own_files.ROLES if any(r in f.roles for f in files) and (
      r in read.roles or r in own_files.OPTIONAL_ROLES))
  for f in files:
    if f.ignored:
      print(f"{name}: {f.path.name}: ignored field(s), not roles of {f.kind} data: "
            + ", ".join(f"{k} ({v} records)" for k, v in sorted(f.ignored.items())), flush=True)
  command = _command(name, train_path, test_path, data_dir, test_percent, image_size, dict(fields or {}))
  builder = make_builder(name, splits, roles, image_size, command, " and ".join(str(f.path) for f in files),
                         data_dir)
  build.write_dataset(name, builder, target)
  counts = {split: len(sources.open_split(name, data_dir, split)) for split in splits}
  if read.kind == "text":
    tok = tokenizer.train_tokenizer(_training_texts(splits["train"]), vocab_size=vocab_size)
    path = tokenizer.save_atomically(tok, tokenizer.dataset_tokenizer_path(data_dir, name, "--name"))
    print(f"{name}: tokenizer with a vocabulary of {tok.vocab_size} -> {path} (a text model reads it with "
          f"config.model.tokenizer = {name!r})", flush=True)
  else:
    build.build_tokenizer(data_dir, vocab_size)
  skipped = sum(f.skips.total for f in files)
  details = "; ".join((f"{f.path.name}: " if len(files) > 1 else "") + f.skips.details() for f in files
                      if f.skips.total)
  print(f"{name}: built {counts} in {time.perf_counter() - start:.1f} s -> {target}; skipped {skipped} record"
        f"{'' if skipped == 1 else 's'}" + (f" ({details})" if details else ""), flush=True)
  return data_dir
