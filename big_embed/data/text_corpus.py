"""Shared pieces of the corpora: skip counting, UTF-8 decoding, hash-based splits, Text values as str.

Every corpus reader turns raw source files into records and a `SkipCounts`: records that are empty
(nothing left after cleaning) or not valid UTF-8 are dropped and counted, never silently repaired.
"""

from __future__ import annotations

import dataclasses
import hashlib


@dataclasses.dataclass
class SkipCounts:
  """How many source records a reader dropped, by reason."""
  empty: int = 0
  non_utf8: int = 0

  def __add__(self, other: SkipCounts) -> SkipCounts:
    return SkipCounts(self.empty + other.empty, self.non_utf8 + other.non_utf8)

  @property
  def total(self) -> int:
    return self.empty + self.non_utf8

  def message(self, name: str) -> str:
    """e.g. "fortunes: skipped 3 empty and 1 non-UTF-8 records"."""
    return f"{name}: skipped {self.empty} empty and {self.non_utf8} non-UTF-8 records"


def to_str(value: object) -> str:
  """A Text value as TFDS returns it (bytes) or as str, as str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_utf8(raw: bytes, skips: SkipCounts) -> str | None:
  """Returns `raw` decoded as strict UTF-8, or None (counted in `skips.non_utf8`) if it is not."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    skips.non_utf8 += 1
    return None


def hash_percent(key: str) -> int:
  """A stable bucket in [0, 100) for `key` (sha1: the same on every machine and Python run)."""
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100


def is_test(key: str, test_percent: int) -> bool:
  """Whether the record with split key `key` belongs to the test split (about `test_percent`%)."""
  return hash_percent(key) < test_percent


def split_by_hash(records, key, test_percent: int) -> dict[str, list]:
  """Splits `records` into {"train": [...], "test": [...]} by `is_test(key(record), ...)`."""
  out: dict[str, list] = {"train": [], "test": []}
  for record in records:
    out["test" if is_test(key(record), test_percent) else "train"].append(record)
  return out
