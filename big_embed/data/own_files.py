"""Your own data: the records of a local .jsonl, .tsv or .csv file, mapped to roles, checked, and split.

Formats (from the extension): `.jsonl` is one JSON object per line; `.tsv` and `.csv` have a header row naming the
fields, then one record per row (`.csv` with the usual double-quote quoting, `.tsv` split at tabs without quoting).
In a header, a field named in several columns (`negative,negative`) is a list; its empty cells are left out.

Roles: a field named like a role is read as that role (`negative` is read as `negatives`); `fields` maps other
names ({"text": "query"}). Other fields are ignored, and listed.

  query      text                   the query of a pair (text data)
  positive   text                   its document (retrieval), or the second text of a scored pair (sts)
  negatives  text or list of texts  hard negatives of the query (optional in every record)
  score      number                 the similarity of query and positive (sts)
  label      string or integer      the record's class (classification; the zero-shot class of an image)
  labels     list of them           the record's classes (multilabel)
  image      string                 an image file: a path relative to the data file's folder, or absolute
  caption    text                   the image's caption
  id         string or integer      what the record is about (optional in every record): records with equal ids
                                    stay on one side of the split; images with equal ids show the same thing

The file's roles are those of its header (.tsv/.csv) or of its first JSON object (.jsonl); `negatives` and `id` may
appear in any record. A file with `image` is image-text data (it needs `caption`; `label` is optional), any other
is text data (it needs `query`, and `positive`, `label` or `labels`; `score` needs `positive`).

Blank lines are no records. A record is skipped, counted by reason with its line number, when it is not a JSON
object, holds bytes that are not UTF-8, lacks one of the file's roles (null, absent, an empty cell or list: "missing
field"), has an empty query, positive or caption ("empty text"), has a value of the wrong type (a query that is not
a string, a score that is not a finite number, a list where one value belongs ...), has more cells than the header,
or names an image that cannot be opened and decoded. Texts are stripped; labels are strings (an integer label 3 is "3").
Images are decoded with PIL, put on white where transparent, resized so that the shorter side is `image_size`
and centre-cropped to a square: uint8 [image_size, image_size, 3], held in memory.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tqdm
from PIL import Image

from big_embed.data.errors import DataError
from big_embed.data.text_corpus import is_test

FORMATS = (".jsonl", ".tsv", ".csv")
ROLES = ("query", "positive", "negatives", "score", "label", "labels", "image", "caption", "id")
ALIASES = {"negative": "negatives"}  # other spellings of a role
TEXT_ROLES = ("query", "positive", "caption")  # non-empty texts
OPTIONAL_ROLES = ("negatives", "id")  # may be missing from any record
IMAGE_ROLES = ("image", "caption", "id", "label")
TEXT_DATA_ROLES = ("query", "positive", "negatives", "score", "label", "labels", "id")
REASONS = ("not a JSON object", "non-UTF-8", "missing field", "empty text", "wrong type", "too many cells",
           "unreadable image")
MAX_LINES_SHOWN = 5  # line numbers printed per skip reason
DEFAULT_IMAGE_SIZE = 64


@dataclasses.dataclass
class Skips:
  """The records a reader skipped: a count per reason (`REASONS`) and the first (smallest) line numbers of each."""
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)

  def add(self, reason: str, line: int) -> None:
    self.counts[reason] = self.counts.get(reason, 0) + 1
    shown = self.lines.setdefault(reason, [])
    bisect.insort(shown, line)  # the first lines, whatever order the checks find them in
    del shown[MAX_LINES_SHOWN:]

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def details(self) -> str:
    """e.g. "missing field: 1, line 4; empty text: 2, lines 7, 9" (the first MAX_LINES_SHOWN lines of each)."""
    parts = []
    for reason in REASONS:
      if reason in self.counts:
        lines = self.lines[reason]
        more = ", ..." if self.counts[reason] > len(lines) else ""
        parts.append(f"{reason}: {self.counts[reason]}, line{'s' if len(lines) > 1 else ''} "
                     f"{', '.join(map(str, lines))}{more}")
    return "; ".join(parts)

  def message(self) -> str:
    """e.g. "skipped 3 records (missing field: 1, line 4; empty text: 2, lines 7, 9)"; "skipped 0 records"."""
    return f"skipped {self.total} record{'' if self.total == 1 else 's'}" + (
        f" ({self.details()})" if self.total else "")


@dataclasses.dataclass
class OwnFile:
  """One file read: its kind ("image" or "text"), its roles (in `ROLES` order), the usable records (role -> value,
  plus "line"), the skipped ones and the ignored fields (name -> records that had it)."""
  path: pathlib.Path
  kind: str
  roles: tuple[str, ...]
  records: list[dict[str, Any]]
  skips: Skips
  ignored: dict[str, int]


class _Bad(Exception):
  """A record to skip; args[0] is the reason (one of REASONS)."""


def _is_utf8(text: str) -> bool:
  """False for strings holding surrogates: undecodable bytes (surrogateescape) or JSON "\\udc80" escapes."""
  try:
    text.encode("utf-8")
    return True
  except UnicodeEncodeError:
    return False


def _text(value: Any) -> str:
  if not isinstance(value, str):
    raise _Bad("wrong type")
  if not _is_utf8(value):
    raise _Bad("non-UTF-8")
  return value.strip()


def _name(value: Any) -> str:
  """An id or label: a string, or an integer written as one."""
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise _Bad("wrong type")
  return _text(str(value))


def _values(value: Any) -> list:
  """A list role's value: one value or a list of them."""
  return value if isinstance(value, list) else [value]


def _check(role: str, value: Any) -> Any:
  """The checked value of `role` (None when absent: an empty string is absent except for a text role); raises
  _Bad."""
  if isinstance(value, str) and role not in TEXT_ROLES and not value.strip():
    return None
  if role in TEXT_ROLES:
    text = _text(value)
    if not text:
      raise _Bad("empty text")
    return text
  if role == "negatives":
    texts = [_text(v) for v in _values(value)]
    return [t for t in texts if t]
  if role == "id":
    return _name(value)
  if role == "score":
    if isinstance(value, str):  # a .tsv/.csv cell
      try:
        value = float(value)
      except ValueError:
        raise _Bad("wrong type") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise _Bad("wrong type")
    return float(value)
  if role == "label":
    return _name(value)
  if role == "labels":
    names = sorted({n for n in (_name(v) for v in _values(value)) if n})
    return names or None
  if role == "image":
    return _text(value)
  raise ValueError(f"unknown role {role!r}")


def _file_error(path: pathlib.Path, problem: str) -> DataError:
  return DataError(f"{path}: {problem}")


def _progress(path: pathlib.Path) -> tqdm.tqdm:
  """A progress bar over the file's bytes (shown on a terminal only)."""
  return tqdm.tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"Reading {path.name}", disable=None)


def _jsonl_rows(path: pathlib.Path, skips: Skips) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) of every JSON object line; other non-blank lines are counted in `skips`."""
  with open(path, "rb") as f, _progress(path) as bar:
    for number, raw in enumerate(f, start=1):
      bar.update(len(raw))
      if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a byte-order mark
      if not raw.strip():
        continue
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        skips.add("non-UTF-8", number)
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if not isinstance(row, dict):
        skips.add("not a JSON object", number)
        continue
      yield number, row


def _counted(lines: Iterator[str], bar: tqdm.tqdm) -> Iterator[str]:
  for line in lines:
    bar.update(len(line))
    yield line


def _table_rows(path: pathlib.Path, skips: Skips) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number of the row's first line, field -> cell, or -> list of non-empty cells for a field the header
  names several times); missing cells at the end of a row are empty."""
  tsv = path.suffix.lower() == ".tsv"
  csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents
  with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f, _progress(path) as bar:
    reader = csv.reader(_counted(f, bar), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
      header = next(reader, None)
      if header is None or not any(h.strip() for h in header):
        raise _file_error(path, "no header row; the first line must name the fields (e.g. query,positive)")
      header = [h.strip() for h in header]
      if not all(_is_utf8(h) for h in header):
        raise _file_error(path, "the header row is not valid UTF-8; save the file as UTF-8")
      repeated = {h for h in header if header.count(h) > 1}
      previous = reader.line_num
      for cells in reader:
        start, previous = previous + 1, reader.line_num
        if not any(c.strip() for c in cells):
          continue
        if len(cells) > len(header):
          skips.add("too many cells", start)
          continue
        row: dict[str, Any] = {h: [] for h in repeated}
        for name, cell in zip(header, cells + [""] * (len(header) - len(cells))):
          if name in repeated:
            if cell.strip():
              row[name].append(cell)
          elif name:
            row[name] = cell
        yield start, row
    except csv.Error as e:
      raise _file_error(path, f"line {reader.line_num}: {e}; check the quoting") from e


def _role_names(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, str]:
  """field -> role of the row's fields that are roles."""
  out = {}
  for field in row:
    role = fields.get(field, field)
    role = ALIASES.get(role, role)
    if role in ROLES:
      out[field] = role
  return out


def _kind(path: pathlib.Path, first: set[str]) -> tuple[str, tuple[str, ...]]:
  """The file's kind and its allowed roles, from the roles of its first record."""
  if "image" in first:
    if "caption" not in first:
      raise _file_error(path, "an image-text file needs a `caption` with every `image`; its first record has "
                        f"{sorted(first)}")
    return "image", IMAGE_ROLES
  if "query" not in first or not first & {"positive", "label", "labels"}:
    raise _file_error(path, "a text file needs `query` and `positive` (retrieval pairs; with `score`: scored "
                      f"pairs), `label` or `labels`; its first record has {sorted(first) or 'no role'} (map other "
                      "field names with --fields, e.g. --fields=text=query)")
  if "score" in first and "positive" not in first:
    raise _file_error(path, "`score` scores a (query, positive) pair, but the file has no `positive`")
  return "text", TEXT_DATA_ROLES


def load_image(path: pathlib.Path, size: int) -> np.ndarray | None:
  """The image at `path` as uint8 [size, size, 3] (see the module docstring), or None if it cannot be read."""
  try:
    with Image.open(path) as image:
      image.load()
      if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
      image = image.convert("RGB")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
  width, height = image.size
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def _load_images(path: pathlib.Path, records: list[dict[str, Any]], size: int, skips: Skips) -> list[dict[str, Any]]:
  """The records whose image loads, each with "image" uint8 [size, size, 3] and, without an id, the image path as
  its id."""
  folder, cache, out = path.parent, {}, []
  for record in tqdm.tqdm(records, desc=f"Loading the images of {path.name}", unit="image", disable=None):
    name = record["image"]
    if name not in cache:
      cache[name] = load_image(folder / os.path.expanduser(name), size)
    if cache[name] is None:
      skips.add("unreadable image", record["line"])
      continue
    out.append({**record, "image": cache[name], "id": record.get("id") or name})
  return out


def read_file(path: str | os.PathLike[str], *, fields: Mapping[str, str] | None = None,
              image_size: int = DEFAULT_IMAGE_SIZE) -> OwnFile:
  """Reads one data file into checked records.

  Args:
    path: a .jsonl, .tsv or .csv file.
    fields: field name -> role, for fields not named like their role.
    image_size: S, the side of the stored images.

  Returns:
    An `OwnFile`: records are dicts of the file's roles (text roles str, negatives list[str] (possibly empty),
    score float, label str, labels list[str] sorted, image uint8 [S, S, 3], id str or absent) and "line".

  Raises:
    DataError: the file is missing or unreadable, its format unknown, its header or first record lacks the roles
      of its kind, or no record is usable.
  """
  path = pathlib.Path(path).expanduser()
  fields = dict(fields or {})
  bad_roles = sorted({ALIASES.get(r, r) for r in fields.values()} - set(ROLES))
  if bad_roles:
    raise DataError(f"--fields maps to unknown role(s) {bad_roles}; the roles are {', '.join(ROLES)}")
  suffix = path.suffix.lower()
  if suffix not in FORMATS:
    raise _file_error(path, f"unknown format {path.suffix or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
  if not path.is_file():
    raise _file_error(path, "no such file")
  skips, ignored = Skips(), {}
  rows = _jsonl_rows(path, skips) if suffix == ".jsonl" else _table_rows(path, skips)
  try:
    parsed = [(line, row, _role_names(row, fields)) for line, row in rows]
  except OSError as e:
    raise _file_error(path, f"cannot be read ({e.strerror or e})") from e
  if not parsed:
    raise _file_error(path, f"no record ({skips.message()})")
  first = set(parsed[0][2].values())
  kind, allowed = _kind(path, first)
  present = {role for _, _, names in parsed for role in names.values()}
  roles = tuple(r for r in ROLES if r in allowed and (r in first or (r in OPTIONAL_ROLES and r in present)))
  records = []
  for line, row, names in parsed:
    for field in row:
      if field not in names or names[field] not in roles:
        ignored[field] = ignored.get(field, 0) + 1
    try:
      record: dict[str, Any] = {}
      for field, role in names.items():
        if role in roles and row[field] is not None:
          value = _check(role, row[field])
          if role == "negatives":
            value = record.get("negatives", []) + value  # `negative` and `negatives` together
          if value is not None:
            record[role] = value
      for role in roles:
        if role not in record and role not in OPTIONAL_ROLES:
          raise _Bad("missing field")
    except _Bad as bad:
      skips.add(bad.args[0], line)
      continue
    if "negatives" in roles:
      record.setdefault("negatives", [])
    record["line"] = line
    records.append(record)
  if kind == "image":
    records = _load_images(path, records, image_size, skips)
    roles = tuple(dict.fromkeys(roles + ("id",)))  # every image has an id (its path by default)
  if not records:
    needed = ", ".join(r for r in roles if r not in OPTIONAL_ROLES)
    raise _file_error(path, f"no usable record ({skips.message()}); each record needs {needed}")
  return OwnFile(path=path, kind=kind, roles=tuple(r for r in ROLES if r in roles), records=records, skips=skips,
                 ignored=ignored)


def split_key(record: Mapping[str, Any]) -> str:
  """What decides a record's split: its id, else its query (text data; images always have an id)."""
  return record.get("id") or record["query"]


def split_by_id(records: list[dict[str, Any]], test_percent: int) -> dict[str, list[dict[str, Any]]]:
  """{"train": [...], "test": [...]}: a record is in test iff sha1(split_key) mod 100 < test_percent
  (`text_corpus.is_test`), so records with equal keys are on one side, on every machine."""
  out: dict[str, list] = {"train": [], "test": []}
  for record in records:
    out["test" if is_test(split_key(record), test_percent) else "train"].append(record)
  return out


def parse_fields(spec: str) -> dict[str, str]:
  """The --fields flag, "column=role,column=role", as a dict.

  Raises:
    DataError: an item is not column=role.
  """
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    column, sep, role = item.partition("=")
    if not sep or not column.strip() or not role.strip():
      raise DataError(f"--fields={spec!r}: {item!r} is not column=role (e.g. --fields=text=query,doc=positive)")
    out[column.strip()] = role.strip()
  return out
