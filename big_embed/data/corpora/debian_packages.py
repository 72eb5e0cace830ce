"""Debian packages of this machine's apt index: summary, long description, section, debtags (TFDS).

Sources: the apt lists in /var/lib/apt/lists: every `*_Packages` file (Package, Version, Section,
Tag = debtags, Description-md5) joined with the English descriptions of the `*_Translation-en` files
(Description-en: the summary line, then the long description), on the description's MD5. The files
may be uncompressed or compressed with lz4 (the `lz4` command, installed as the Debian package
`lz4` if missing), gzip, xz or bzip2. Without any Translation-en file the build stops with the
command that fetches them, `apt-get update -o Acquire::Languages=en` (run by prepare itself when
root). Contents depend on the machine's apt sources; Debian 12 "bookworm" main gives ~63k packages,
~30k with debtags.

Licence: package descriptions are part of the Debian archive's metadata, written by each package's
maintainers and distributed with the packages under their licences (all DFSG-free in main);
debtags come from the Debian tag database (https://wiki.debian.org/Debtags), public.

Parsing: a package listed several times (several suites, architectures or versions) keeps the
highest version (dpkg ordering) that has an English long description, and the tags of the highest
version that has a Tag field (security/update suites carry none). The long description is turned
into plain text: lines are unwrapped into paragraphs, " ." lines separate paragraphs ("\\n\\n"),
and lines indented by two spaces or more (lists, examples) keep their line breaks. Packages without
a non-empty long description are skipped (counted as empty), as are stanzas that are not UTF-8.

Features: `package` Text, `summary` Text, `description` Text, `section` ClassLabel (section names
without an archive-area prefix such as "contrib/", sorted; "unknown" when the field is missing),
`tags` Sequence(ClassLabel) (the debtags found at build time, sorted, e.g. "game::strategy").
Splits: a package is in `test` iff sha1(name) mod 100 < 10 (about 10%), else in `train`.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import zlib
from collections.abc import Iterable, Iterator, Sequence

import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts, decode_utf8, split_by_hash

LISTS_DIR = pathlib.Path("/var/lib/apt/lists")
DEBIAN_PACKAGES: tuple[str, ...] = ()  # `lz4` is installed only when an lz4-compressed list needs it.
LZ4_PACKAGE = "lz4"
UPDATE_COMMAND = ("apt-get", "update", "-o", "Acquire::Languages=en")
TEST_PERCENT = 10
UNKNOWN_SECTION = "unknown"
_COMPRESSIONS = ("", ".lz4", ".gz", ".xz", ".bz2")


@dataclasses.dataclass(frozen=True)
class Package:
  """One package of the index."""
  package: str
  summary: str
  description: str
  section: str
  tags: tuple[str, ...]


# Debian version ordering (dpkg's verrevcmp).

def _char_order(ch: str) -> int:
  if ch == "" or ch.isdigit():
    return 0
  if ch == "~":
    return -1
  if ch.isascii() and ch.isalpha():
    return ord(ch)
  return ord(ch) + 256


def _verrevcmp(a: str, b: str) -> int:
  i = j = 0
  while i < len(a) or j < len(b):
    while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
      ac = _char_order(a[i] if i < len(a) else "")
      bc = _char_order(b[j] if j < len(b) else "")
      if ac != bc:
        return ac - bc
      i, j = i + 1, j + 1
    while i < len(a) and a[i] == "0":
      i += 1
    while j < len(b) and b[j] == "0":
      j += 1
    first_diff = 0
    while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
      if not first_diff:
        first_diff = ord(a[i]) - ord(b[j])
      i, j = i + 1, j + 1
    if i < len(a) and a[i].isdigit():
      return 1
    if j < len(b) and b[j].isdigit():
      return -1
    if first_diff:
      return first_diff
  return 0


def _split_version(version: str) -> tuple[int, str, str]:
  epoch, _, rest = version.partition(":") if ":" in version else ("0", "", version)
  upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
  try:
    return int(epoch or 0), upstream, revision
  except ValueError:
    return 0, upstream, revision


def compare_versions(a: str, b: str) -> int:
  """Compares Debian versions like `dpkg --compare-versions`: <0, 0 or >0."""
  (ea, ua, ra), (eb, ub, rb) = _split_version(a), _split_version(b)
  if ea != eb:
    return ea - eb
  return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


class _Version:
  """A sort key ordering versions as dpkg does."""

  def __init__(self, version: str):
    self.version = version

  def __lt__(self, other: _Version) -> bool:
    return compare_versions(self.version, other.version) < 0


# deb822 stanzas and descriptions.

def iter_stanzas(data: bytes, skips: SkipCounts) -> Iterator[dict[str, str]]:
  """Yields the stanzas of a deb822 file as {field (lower case): value}; continuation lines keep
  their leading space in the value ("summary\\n line 1\\n ."). Non-UTF-8 stanzas are counted."""
  for block in re.split(rb"\n[ \t]*\n", data):
    if not block.strip():
      continue
    text = decode_utf8(block, skips)
    if text is None:
      continue
    fields: dict[str, str] = {}
    key = None
    for line in text.split("\n"):
      if line[:1] in (" ", "\t") and key is not None:
        fields[key] += "\n" + line
      elif ":" in line:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        fields[key] = value.strip()
    yield fields


def description_to_text(long_lines: Sequence[str]) -> str:
  """Turns the lines of a Debian long description (each starting with a space) into plain text."""
  paragraphs: list[str] = []
  lines: list[str] = []  # Output lines of the current paragraph.
  prose: list[str] = []  # Words of the current unwrapped line.

  def flush_prose():
    if prose:
      lines.append(" ".join(prose))
      prose.clear()

  for raw in long_lines:
    body = raw[1:] if raw[:1] in (" ", "\t") else raw
    if body.strip() == ".":
      flush_prose()
      if lines:
        paragraphs.append("\n".join(lines))
        lines.clear()
    elif body[:1] in (" ", "\t"):  # Verbatim line.
      flush_prose()
      lines.append(body[1:].rstrip())
    elif body.strip():
      prose.append(body.strip())
  flush_prose()
  if lines:
    paragraphs.append("\n".join(lines))
  return "\n\n".join(p for p in paragraphs if p.strip()).strip("\n")


def _split_description(value: str) -> tuple[str, str]:
  """(summary, plain-text long description) of a Description(-en) field value."""
  summary, *long_lines = value.split("\n")
  return summary.strip(), description_to_text(long_lines)


def read_apt_index(packages_data: Iterable[bytes], translation_data: Iterable[bytes]
                   ) -> tuple[list[Package], SkipCounts]:
  """Joins Packages stanzas with Translation-en descriptions (pure: takes file contents).

  Args:
    packages_data: the decompressed contents of `*_Packages` files.
    translation_data: the decompressed contents of `*_Translation-en` files.

  Returns:
    (packages sorted by name, skips): see the module docstring for the merge rules.
  """
  skips = SkipCounts()
  descriptions: dict[str, str] = {}  # Description-md5 -> Description-en.
  for data in translation_data:
    for stanza in iter_stanzas(data, skips):
      if stanza.get("description-md5") and "description-en" in stanza:
        descriptions.setdefault(stanza["description-md5"], stanza["description-en"])
  candidates: dict[str, list[dict[str, str]]] = {}
  for data in packages_data:
    for stanza in iter_stanzas(data, skips):
      if stanza.get("package"):
        candidates.setdefault(stanza["package"], []).append(stanza)
  out = []
  for name in sorted(candidates):
    stanzas = sorted(candidates[name], key=lambda s: _Version(s.get("version", "0")), reverse=True)
    described = None
    for stanza in stanzas:
      value = stanza.get("description", "")
      if "\n" not in value:  # Only the summary here: the full text is in a Translation file.
        value = descriptions.get(stanza.get("description-md5", ""), "")
      summary, long_text = _split_description(value) if value else ("", "")
      if long_text:
        described = (stanza, summary, long_text)
        break
    if described is None:
      skips.empty += 1
      continue
    stanza, summary, long_text = described
    section = stanza.get("section", "").rsplit("/", 1)[-1] or UNKNOWN_SECTION
    tag_field = next((s["tag"] for s in stanzas if s.get("tag", "").strip()), "")
    tags = tuple(dict.fromkeys(t.strip() for t in tag_field.split(",") if t.strip()))
    out.append(Package(name, summary, long_text, section, tags))
  return out, skips


# Files.

def read_list_file(path: pathlib.Path) -> bytes:
  """Returns the decompressed contents of an apt list file (plain, .lz4, .gz, .xz or .bz2).

  Raises:
    DataError: the file cannot be read or decompressed, or `lz4` is missing and cannot be installed.
  """
  try:
    if path.suffix == ".lz4":
      if shutil.which("lz4") is None:
        debian.ensure_package(LZ4_PACKAGE)
      proc = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, check=False)
      if proc.returncode != 0:
        raise OSError(proc.stderr.decode(errors="replace").strip() or f"lz4 exit {proc.returncode}")
      return proc.stdout
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
    raise DataError(f"Cannot read apt list {path} ({e}); refresh the lists with: "
                    f"sudo {' '.join(UPDATE_COMMAND)}") from e


def _list_files(lists_dir: pathlib.Path, kind: str) -> list[pathlib.Path]:
  """The `*_<kind>` list files (one compression each, the uncompressed one preferred)."""
  chosen: dict[str, pathlib.Path] = {}
  for ext in _COMPRESSIONS:
    for path in sorted(lists_dir.glob(f"*_{kind}{ext}")):
      if path.is_file():
        chosen.setdefault(path.name[:len(path.name) - len(ext)], path)
  return [chosen[k] for k in sorted(chosen)]


def index_files(lists_dir: pathlib.Path | None = None, *, may_update: bool = True
                ) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Returns the (Packages files, Translation-en files) of `lists_dir` (default `LISTS_DIR`).

  When either kind is missing and we are root (and `may_update`), runs
  `apt-get update -o Acquire::Languages=en` once and looks again.

  Raises:
    DataError: no Packages or no Translation-en file; the message is the command that fetches them.
  """
  lists_dir = LISTS_DIR if lists_dir is None else lists_dir
  packages, translations = _list_files(lists_dir, "Packages"), _list_files(
      lists_dir, "Translation-en")
  if (not packages or not translations) and may_update and _can_update():
    print(f"debian_packages: fetching the apt lists: {' '.join(UPDATE_COMMAND)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(list(UPDATE_COMMAND), env=env, check=False)
    packages, translations = _list_files(lists_dir, "Packages"), _list_files(
        lists_dir, "Translation-en")
  if not packages:
    raise DataError(f"No apt package lists (*_Packages) in {lists_dir}; fetch them with: "
                    f"sudo {' '.join(UPDATE_COMMAND)}")
  if not translations:
    raise DataError(f"No English package descriptions (*_Translation-en) in {lists_dir}; fetch "
                    f"them with: sudo {' '.join(UPDATE_COMMAND)}")
  return packages, translations


def _can_update() -> bool:
  return bool(hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"))


def read_index(lists_dir: pathlib.Path | None = None, *, may_update: bool = True
               ) -> tuple[list[Package], SkipCounts]:
  """Reads the apt index in `lists_dir` (default `LISTS_DIR`) into packages (`read_apt_index`)."""
  packages, translations = index_files(lists_dir, may_update=may_update)
  return read_apt_index((read_list_file(p) for p in packages),
                        (read_list_file(p) for p in translations))


class DebianPackagesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of the local apt index's package descriptions and debtags (no download)."""

  name = "big_embed_debian_packages"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "apt Packages joined with Translation-en: descriptions, sections, tags."}
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Debian packages of the local apt index: summary, long description, section "
                    "and debtags.",
        features=tfds.features.FeaturesDict({
            "package": tfds.features.Text(),
            "summary": tfds.features.Text(),
            "description": tfds.features.Text(),
            "section": tfds.features.ClassLabel(),  # Names set from the index at build time.
            "tags": tfds.features.Sequence(tfds.features.ClassLabel()),
        }),
        homepage="https://packages.debian.org/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    packages, self.skip_counts = read_index()
    if not packages:
      raise DataError(f"No package with an English long description in the apt lists of "
                      f"{LISTS_DIR}; refresh them with: sudo {' '.join(UPDATE_COMMAND)}")
    self.info.features["section"].names = sorted({p.section for p in packages})
    self.info.features["tags"].feature.names = sorted({t for p in packages for t in p.tags})
    splits = split_by_hash(packages, lambda p: p.package, TEST_PERCENT)
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, packages):
    for p in packages:
      yield p.package, {"package": p.package, "summary": p.summary, "description": p.description,
                        "section": p.section, "tags": list(p.tags)}


registry.register(registry.Corpus(
    name="debian_packages", builder=DebianPackagesBuilder, kind="text", debian_packages=DEBIAN_PACKAGES,
    fields={"package": "text", "summary": "text", "description": "text", "section": "class", "tags": "class_seq"},
    retrieval=("summary", "description"), probe=("summary", "section"), multilabel=("description", "tags")))
