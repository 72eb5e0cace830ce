"""Datasets found in a data directory: built from your own files (`prepare files`) or by you with TFDS.

A directory `<data_dir>/<name>/<version>/` holding a finished TFDS dataset (its dataset_info.json and
features.json) is dataset `name`, unless `name` is a registered corpus or its builder's directory; of several
versions the newest is read. It gets a registry entry (`corpora.Corpus`) built from its features, so that every
consumer finds it by name like a bundled corpus (through `sources.corpus(name, data_dir)`). Its fields take roles
by their names:

  text data     query, positive (Text): the retrieval default (query -> positive); with score (a number): the sts
                default; label (ClassLabel): the linear-probe default (query -> label); labels
                (Sequence(ClassLabel)): the multilabel default; negatives or negative (Text or Sequence(Text)):
                the in-record hard negatives of the (query, positive) pairs
  image-text    image (an Image or uint8 Tensor) and caption (Text): training captions every image with its
                caption; image <-> caption retrieval; label (ClassLabel): zero-shot classification of the class
                names (ClassLabel names with "_", "." and "::" as spaces) in `PROMPT_TEMPLATES`; id (Text): images
                with equal ids show the same thing (without one, equal captions do)

Any other field is readable by naming it (e.g. a text task's `fields`). The dataset must be stored as array_record
(the format Grain reads without TensorFlow); `prepare files` writes the command that built it into the dataset's
metadata, which the "rebuild it with" messages repeat. Builder configs (`<name>/<config>/<version>`) are not
looked into.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from big_embed.data import corpora
from big_embed.data.errors import DataError
from big_embed.data.mined_negatives import MINED_DIR
from big_embed.data.text_corpus import to_str

FILE_FORMAT = "array_record"
PROMPT_TEMPLATES = ("{}", "a photo of a {}.", "a picture of a {}.")
INFO_FILE = "dataset_info.json"


class FoundBuilder:
  """The `Corpus.builder` of a found dataset: like a TFDS builder class it has `name` and `VERSION` (where the
  dataset lives: `<data_dir>/<name>/<VERSION>`); calling it gives a TFDS reader of that directory
  (`tfds.builder_from_directory`). `command` is the command that built it ("" if not `prepare files`)."""

  name = ""
  VERSION = tfds.core.Version("0.0.0")
  command = ""

  def __new__(cls, data_dir: str, file_format: str = FILE_FORMAT) -> tfds.core.DatasetBuilder:
    del file_format  # what the dataset was stored as
    directory = pathlib.Path(data_dir) / cls.name / str(cls.VERSION)
    builder = tfds.builder_from_directory(directory)
    stored = builder.info.file_format
    if stored is not None and getattr(stored, "value", stored) != FILE_FORMAT:
      raise DataError(f"Dataset {cls.name!r} in {directory} is stored as {getattr(stored, 'value', stored)}, but "
                      f"big_embed reads only {FILE_FORMAT}; convert it with: tfds convert_format "
                      f"--dataset_version_dir={directory} --out_file_format={FILE_FORMAT}")
    return builder


@dataclasses.dataclass(frozen=True)
class Found:
  """The datasets of a data directory: name -> registry entry, and name -> why `<data_dir>/<name>` is unreadable."""
  corpora: dict[str, corpora.Corpus]
  problems: dict[str, str]


def _example(record: dict[str, Any], *, id_field: str) -> dict[str, Any]:
  """A training example of a found image dataset: images with equal ids (text ids of `id_field`) are positives."""
  from big_embed.data import text_records  # pylint: disable=g-import-not-at-top  (it reads through `sources`)
  return {"ids": text_records.text_id(to_str(record[id_field]).strip()), "caption": to_str(record["caption"])}


def _caption(element: dict[str, Any], rng: np.random.Generator) -> str:
  """The image's caption (there is one per record)."""
  del rng
  return element["caption"]


def _caption_texts(read_split: Callable[[str], Sequence[dict[str, Any]]], *, class_names: tuple[str, ...]
                   ) -> Iterator[str]:
  """The training captions, and the zero-shot prompts of the class names."""
  for record in read_split("train"):
    yield to_str(record["caption"])
  for template in PROMPT_TEMPLATES if class_names else ():
    for name in class_names:
      yield template.format(name)


def corpus_for(name: str, builder: type[FoundBuilder], features: tfds.features.FeaturesDict,
               splits: Sequence[str]) -> corpora.Corpus:
  """The registry entry of a found dataset with these features: its roles from its field names (module docstring).
  """
  from big_embed.data import text_records  # pylint: disable=g-import-not-at-top  (it reads through `sources`)
  fields = {field: corpora.field_kind(features[field]) for field in features.keys()}

  def has(field: str, *kinds: str) -> bool:
    return fields.get(field) in kinds

  common = dict(name=name, builder=builder, fields=fields, splits=tuple(splits))
  if has("image", "image") and has("caption", "text"):
    label = "label" if has("label", "class") else ""
    class_names = tuple(text_records.humanize_label(n) for n in features["label"].names) if label else ()
    id_field = "id" if has("id", "text") else "caption"
    image_text = corpora.ImageText(
        example=functools.partial(_example, id_field=id_field), caption=_caption,
        caption_texts=functools.partial(_caption_texts, class_names=class_names), image_field="image",
        label_field=label, class_names=class_names, prompt_templates=PROMPT_TEMPLATES if label else (),
        caption_field="caption", id_field=id_field)
    return corpora.Corpus(kind="image", image_text=image_text, **common)
  text = corpora.TEXT_KINDS
  query = has("query", *text)
  retrieval = ("query", "positive") if query and has("positive", *text) else None
  negatives = next((f for f in ("negatives", "negative") if has(f, *text)), None) if retrieval else None
  return corpora.Corpus(
      kind="text", retrieval=retrieval, negatives=negatives,
      sts=retrieval + ("score",) if retrieval and has("score", "float") else None,
      probe=("query", "label") if query and has("label", "class") else None,
      multilabel=("query", "labels") if query and has("labels", "class_seq") else None, **common)


@functools.lru_cache(maxsize=256)
def _read(name: str, directory: str, mtime_ns: int) -> corpora.Corpus:
  """The entry of the dataset in `directory` (cached until its dataset_info.json changes)."""
  del mtime_ns  # Only part of the cache key.
  reader = tfds.builder_from_directory(directory)
  metadata = reader.info.metadata or {}
  builder = type(f"Found_{name}", (FoundBuilder,), {
      "name": name, "VERSION": tfds.core.Version(pathlib.Path(directory).name),
      "command": str(metadata.get("command", ""))})
  return corpus_for(name, builder, reader.info.features, list(reader.info.splits.keys()))


def _newest_version(folder: pathlib.Path) -> str | None:
  """The newest `<folder>/<version>` holding a finished dataset, or None."""
  versions = []
  for child in folder.iterdir():
    try:
      version = tfds.core.Version(child.name)
    except ValueError:
      continue  # e.g. TFDS's incomplete.* directories
    if (child / INFO_FILE).is_file():
      versions.append(version)
  return str(max(versions)) if versions else None


def find(data_dir: pathlib.Path) -> Found:
  """The datasets found in `data_dir` (an absolute path; module docstring), re-read when they change."""
  found, problems = {}, {}
  if not data_dir.is_dir():
    return Found(found, problems)
  reserved = {MINED_DIR, *corpora.names(), *(c.builder.name for c in corpora.entries())}
  for folder in sorted(data_dir.iterdir()):
    if folder.name in reserved or folder.name.startswith(".") or not folder.is_dir():
      continue
    version = _newest_version(folder)
    if version is None:
      continue
    directory = folder / version
    if not folder.name.isidentifier():
      problems[folder.name] = (f"Dataset directory {directory} is not named like a dataset (letters, digits and _); "
                               "rename its folder to use it")
      continue
    try:
      found[folder.name] = _read(folder.name, str(directory), (directory / INFO_FILE).stat().st_mtime_ns)
    except Exception as e:  # pylint: disable=broad-except
      problems[folder.name] = (f"Cannot read dataset {folder.name!r} in {directory} ({type(e).__name__}: {e}); "
                               "rebuild it")
  return Found(found, problems)
