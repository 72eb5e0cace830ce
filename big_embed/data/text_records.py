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
_CHUNK = 4096  # records read at once


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
  """Reads whole fields ("columns") of prepared splits, each split opened once and each field read once."""

  def __init__(self, data_dir: str | None):
    self._data_dir = data_dir
    self._splits: dict[tuple[str, str], tuple[sources.CheckedSource, dict[str, list]]] = {}

  def read(self, dataset: str, split: str, fields: Sequence[str]) -> dict[str, list]:
    """field -> the raw value of every record of the split, in record order.

    Raises:
      DataError: the dataset or split is not prepared, or a record cannot be read.
    """
    key = (dataset, split)
    if key not in self._splits:
      self._splits[key] = (sources.open_split(dataset, self._data_dir, split), {})
    source, columns = self._splits[key]
    missing = [f for f in dict.fromkeys(fields) if f not in columns]
    if missing:
      new = {f: [] for f in missing}
      for start in range(0, len(source), _CHUNK):
        for record in source.__getitems__(range(start, min(start + _CHUNK, len(source)))):
          for f in missing:
            new[f].append(record[f])
      columns.update(new)
    return {f: columns[f] for f in fields}


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
