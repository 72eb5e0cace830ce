"""FOLDOC, the Free On-line Dictionary of Computing: terms, definitions and categories, as TFDS.

Source (Debian package): `dict-foldoc`, the dictd database /usr/share/dictd/foldoc.index (headword,
base64 offset, base64 length per line) and foldoc.dict.dz (dictzip, i.e. gzip-compatible).

Licence: GNU Free Documentation License, version 1.1 or later, no invariant sections (Copyright
1993 by Denis Howe; see /usr/share/doc/dict-foldoc/copyright). Cite as "The Free On-line
Dictionary of Computing, https://foldoc.org/, Editor Denis Howe". A derived dataset must stay
under the GFDL.

Parsing: one record per distinct entry (several index headwords may point to the same text); the
dictd `00-database-*` entries are left out. The term is the entry's first line (original case;
alternative names on the following header lines are dropped).
Categories are the "<language, tool>" markers that open a paragraph or a numbered sense of the
body; they are removed from the text. In the definition, cross-reference braces are removed
("{Unix}" -> "Unix", "{home page (http://...)}" -> "home page"; not in code lines), the closing
"(YYYY-MM-DD)" revision date is dropped, paragraphs are unwrapped and separated by blank lines, and
indented code or example lines keep their line breaks (relative indentation kept). Entries not valid
UTF-8, or with an empty definition, are skipped.

Features: `term` Text, `definition` Text, `categories` Sequence(Text) (e.g. ["language", "tool"]).
Splits: an entry is in `test` iff sha1(term) mod 100 < 10 (about 10%), else in `train`.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import re
import zlib

import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts, decode_utf8, split_by_hash

DEBIAN_PACKAGE = "dict-foldoc"
DEBIAN_PACKAGES = (DEBIAN_PACKAGE,)
INDEX_FILE, DICT_FILE = "/foldoc.index", "/foldoc.dict.dz"
TEST_PERCENT = 10
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {ch: i for i, ch in enumerate(_B64)}
_BODY_INDENT = 3  # Body lines are indented 3 spaces; deeper lines are code or examples.
# A category marker opening a paragraph or a numbered sense: "<language, tool>" (no e-mail, URL,
# BNF or HTML: those contain "@", ".", "/", "=", ... or sit deeper than the body indentation).
_CATEGORY = re.compile(r"^ {0,3}(\d+\.[ \t]*)?<([A-Za-z0-9][A-Za-z0-9 '\-]*(?:,[ \t]*[A-Za-z0-9]"
                       r"[A-Za-z0-9 '\-]*)*)>[ \t]*")
_XREF = re.compile(r"\{([^{}]*)\}")
_XREF_URL = re.compile(r"\s+\((?:https?|ftp|mailto|news|telnet|gopher):[^()\s]*\)$|\s+\([^()\s]*\."
                       r"html?\)$")
_DATE = re.compile(r"\(\d{4}-\d{2}-\d{2}\)")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One FOLDOC entry."""
  term: str
  definition: str
  categories: tuple[str, ...]


def decode_b64_number(text: str) -> int:
  """Decodes a dictd index number ("Gb9L"): base-64 digits, most significant first.

  Raises:
    ValueError: `text` holds a character that is not a base-64 digit.
  """
  value = 0
  for ch in text:
    if ch not in _B64_VALUE:
      raise ValueError(f"{ch!r} is not a base-64 digit")
    value = value * 64 + _B64_VALUE[ch]
  return value


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip(" \t"))


def _xref_text(match: re.Match) -> str:
  """"{text}" -> text and "{text (url)}" -> text; braces in code lines are left alone."""
  line_start = match.string.rfind("\n", 0, match.start()) + 1
  inner_lines = match.group(1).split("\n")
  if _indent(match.string[line_start:]) > _BODY_INDENT or any(
      _indent(line) > _BODY_INDENT for line in inner_lines[1:] if line.strip()):
    return match.group(0)
  return _XREF_URL.sub("", match.group(1))


def _paragraph_text(lines: list[str]) -> str:
  """Unwraps body lines (indented <= 3) into one line; deeper (code) lines keep their breaks."""
  out: list[str] = []
  prose: list[str] = []
  for line in lines:
    if _indent(line) > _BODY_INDENT:
      if prose:
        out.append(" ".join(prose))
        prose = []
      out.append(line[_BODY_INDENT:].rstrip())
    else:
      prose.append(line.strip())
  if prose:
    out.append(" ".join(prose))
  return "\n".join(out)


def parse_entry(text: str) -> Entry:
  """Parses the text of one dictd entry: the term, alternative names, a blank line, the body."""
  head, body = (re.split(r"\n[ \t]*\n", text, maxsplit=1) + [""])[:2]
  term = head.split("\n", 1)[0].strip()
  body = _XREF.sub(_xref_text, body)
  paragraphs = [p for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
  categories: list[str] = []
  cleaned: list[str] = []
  for index, paragraph in enumerate(paragraphs):
    lines = paragraph.strip("\n").split("\n")
    match = _CATEGORY.match(lines[0])
    if match:
      categories.extend(c.strip() for c in match.group(2).split(","))
      lines[0] = " " * _BODY_INDENT + (match.group(1) or "") + lines[0][match.end():]
    if index == len(paragraphs) - 1 and _DATE.fullmatch(paragraph.strip()):
      continue  # The revision date.
    text = _paragraph_text(lines).strip("\n").rstrip()
    if text:
      cleaned.append(text)
  return Entry(term, "\n\n".join(cleaned), tuple(dict.fromkeys(c for c in categories if c)))


def read_foldoc(index_path: pathlib.Path, dict_path: pathlib.Path) -> tuple[list[Entry], SkipCounts]:
  """Reads a dictd database (.index + .dict or .dict.dz) into entries, in file order.

  Raises:
    DataError: a file cannot be read or decompressed, or an index line is malformed.
  """
  try:
    index = index_path.read_bytes()
    data = gzip.decompress(dict_path.read_bytes()) if dict_path.suffix == ".dz" else (
        dict_path.read_bytes())
  except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise DataError(f"Cannot read the dictd database {dict_path} / {index_path}: {e}. Reinstall it "
                    f"with: sudo apt-get install --reinstall -y {DEBIAN_PACKAGE}") from e
  spans: dict[tuple[int, int], list[bytes]] = {}
  for number, line in enumerate(index.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split(b"\t")
    try:
      if len(fields) < 3:
        raise ValueError("expected headword<TAB>offset<TAB>length")
      start, length = (decode_b64_number(f.decode("ascii")) for f in fields[1:3])
      if start + length > len(data):
        raise ValueError(f"entry {start}+{length} is past the end of {dict_path} ({len(data)} bytes)")
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f"Malformed dictd index line {index_path}:{number} ({e}): {line[:80]!r}") from e
    spans.setdefault((start, length), []).append(fields[0])
  skips, out = SkipCounts(), []
  for (start, length), headwords in sorted(spans.items()):
    if all(h.startswith((b"00-database", b"00database")) for h in headwords):
      continue  # dictd metadata, not an entry.
    text = decode_utf8(data[start:start + length], skips)
    if text is None:
      continue
    entry = parse_entry(text)
    if not entry.term or not entry.definition:
      skips.empty += 1
      continue
    out.append(entry)
  return out, skips


class FoldocBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of FOLDOC entries from the local Debian package (no download)."""

  name = "big_embed_foldoc"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "FOLDOC (dict-foldoc): term, plain-text definition, categories."}
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="The Free On-line Dictionary of Computing: terms, definitions and subject "
                    "categories.",
        features=tfds.features.FeaturesDict({
            "term": tfds.features.Text(),
            "definition": tfds.features.Text(),
            "categories": tfds.features.Sequence(tfds.features.Text()),
        }),
        homepage="https://foldoc.org/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    entries, self.skip_counts = read_foldoc(debian.package_file(DEBIAN_PACKAGE, INDEX_FILE),
                                            debian.package_file(DEBIAN_PACKAGE, DICT_FILE))
    if not entries:
      raise DataError(f"No entry found in the dictd database of {DEBIAN_PACKAGE}")
    splits = split_by_hash(entries, lambda e: e.term, TEST_PERCENT)
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, entries):
    for i, e in enumerate(entries):
      yield f"{i}:{e.term}", {"term": e.term, "definition": e.definition,
                              "categories": list(e.categories)}


registry.register(registry.Corpus(
    name="foldoc", builder=FoldocBuilder, kind="text", debian_packages=DEBIAN_PACKAGES,
    fields={"term": "text", "definition": "text", "categories": "text_seq"}, retrieval=("definition", "term")))
