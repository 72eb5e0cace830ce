"""Text records as the text tasks, the text evaluators and mining read them.

A Text field is a stripped str; a Sequence(Text) field is its non-empty items joined with ", " (e.g. WordNet lemmas
"dog, domestic dog"). A label's text is its ClassLabel name with the separators "::", "." and "_" turned into spaces
("noun.animal" -> "noun animal", "game::strategy" -> "game strategy"); a Text label is used as it is. Equal texts
get equal stable ids (`text_id`), so that equal documents are not each other's negatives.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from big_embed.data import sources
from big_embed.data.text_corpus import to_str

_LABEL_SEPARATORS = re.compile(r"::|[._]")


def as_text(value: Any) -> str:
  """Text -> stripped str; Sequence(Text) -> its non-empty items joined with ", "."""
  if isinstance(value, (bytes, str)):
    return to_str(value).strip()
  return ", ".join(t for t in (to_str(v).strip() for v in value) if t)


def humanize_label(name: str) -> str:
  """A ClassLabel name as text: "::", "." and "_" become spaces ("noun.animal" -> "noun animal")."""
  return " ".join(_LABEL_SEPARATORS.sub(" ", name).split())


def text_id(text: str) -> int:
  """A stable non-negative int32 id of a text (equal texts, equal ids)."""
  return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


class ColumnReader:
  """Reads whole fields ("columns") of prepared splits (`sources.read_all`: each split parsed once per process)."""

  def __init__(self, data_dir: str | None):
    self._data_dir = data_dir

  def read(self, dataset: str, split: str, fields: Sequence[str]) -> dict[str, list]:
    """field -> the raw value of every record of the split, in record order.

    Raises:
      DataError: the dataset or split is not prepared, or a record cannot be read.
    """
    records = sources.read_all(dataset, self._data_dir, split)
    return {f: [r[f] for r in records] for f in fields}


def label_vocab(feature: Any, values: list) -> tuple[list[str], list[list[int]]]:
  """(label texts, each record's sorted label ids) of a label field: ClassLabel, Text, or a Sequence of either.

  A ClassLabel's texts are its humanized names, in id order; Text labels are numbered by their sorted distinct
  non-empty texts (empty ones are no label).
  """
  inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
  single = inner is feature
  if isinstance(inner, tfds.features.ClassLabel):
    texts = [humanize_label(n) for n in inner.names]
    return texts, [[int(v)] if single else sorted({int(x) for x in v}) for v in values]
  per_record = [[to_str(v).strip()] if single else [to_str(x).strip() for x in v] for v in values]
  per_record = [[t for t in labels if t] for labels in per_record]
  vocab = sorted({t for labels in per_record for t in labels})
  index = {t: i for i, t in enumerate(vocab)}
  return vocab, [sorted({index[t] for t in labels}) for labels in per_record]
