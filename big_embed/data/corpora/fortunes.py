"""Fortune cookies (quotes, jokes, definitions) labelled with their fortune file, as a TFDS builder.

Sources (Debian packages): `fortunes` and `fortunes-min`, the data files under
/usr/share/games/fortunes (records separated by lines holding a single "%"). The `.dat` indexes and
`.u8` links are not read, nor the offensive collection (`off/`, package `fortunes-off`).

Licence: distributed with fortune-mod under its BSD licence (Debian copyright file of `fortunes`);
the quotations themselves are short excerpts of many authors, collected over decades on Usenet.

Parsing: a record keeps its internal whitespace (ASCII art stays aligned); leading and trailing
blank lines are dropped. Records that are empty or not valid UTF-8 are skipped (the empty text after
a file's final "%" is the format's terminator, not a record).

Features: `text` Text, `category` ClassLabel (the fortune file names found at build time, sorted,
e.g. "science"). Splits: a fortune is in `test` iff sha1(text) mod 100 < 20 (about 20%), else in
`train`; hashing the text keeps a fortune found in two files on one side.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts, decode_utf8, split_by_hash

DEBIAN_PACKAGES = ("fortunes", "fortunes-min")
FORTUNE_DIR = "/usr/share/games/fortunes/"
TEST_PERCENT = 20


@dataclasses.dataclass(frozen=True)
class Fortune:
  """One fortune: its text and the file (category) it comes from."""
  key: str  # "<category>:<index in the file>"
  text: str
  category: str


def parse_fortune_file(data: bytes, category: str) -> tuple[list[Fortune], SkipCounts]:
  """Splits the bytes of one fortune file into fortunes (pure).

  Args:
    data: the file's bytes; records are separated by lines that are exactly "%".
    category: the file name, used as every record's category.

  Returns:
    (fortunes in file order, skips).
  """
  skips, out = SkipCounts(), []
  groups: list[list[bytes]] = [[]]
  for line in data.split(b"\n"):
    if line.rstrip(b"\r") == b"%":
      groups.append([])
    else:
      groups[-1].append(line)
  if len(groups) > 1 and not b"".join(groups[-1]).strip():
    groups.pop()  # The terminator after the final "%".
  for index, lines in enumerate(groups):
    text = decode_utf8(b"\n".join(lines), skips)
    if text is None:
      continue
    text = text.strip("\r\n").rstrip()
    if not text.strip():
      skips.empty += 1
      continue
    out.append(Fortune(f"{category}:{index}", text, category))
  return out, skips


def read_fortunes(paths: Sequence[pathlib.Path]) -> tuple[list[Fortune], SkipCounts]:
  """Reads fortune files (category = file name) into fortunes, in the order of `paths`.

  Raises:
    DataError: a file cannot be read.
  """
  skips, out = SkipCounts(), []
  for path in paths:
    try:
      data = path.read_bytes()
    except OSError as e:
      raise DataError(f"Cannot read fortune file {path}: {e}") from e
    fortunes, file_skips = parse_fortune_file(data, path.name)
    out.extend(fortunes)
    skips += file_skips
  return out, skips


def is_fortune_file(path: pathlib.Path) -> bool:
  """Whether `path` is a fortune data file (not an index, a `.u8` link or an offensive one)."""
  return (path.parent.as_posix() == FORTUNE_DIR.rstrip("/")  # Not in a subdirectory such as off/.
          and path.suffix not in (".dat", ".u8") and not path.is_symlink() and path.is_file())


def fortune_paths() -> list[pathlib.Path]:
  """The installed fortune files of `DEBIAN_PACKAGES` (installing them if allowed), sorted by name."""
  paths = {p for package in DEBIAN_PACKAGES for p in debian.ensure_package(package)
           if is_fortune_file(p)}
  if not paths:
    raise DataError(f"No fortune file found in {FORTUNE_DIR}; reinstall them with: "
                    f"sudo apt-get install --reinstall -y {' '.join(DEBIAN_PACKAGES)}")
  return sorted(paths, key=lambda p: p.name)


class FortunesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of fortunes labelled by file from local Debian packages (no download)."""

  name = "big_embed_fortunes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "fortunes and fortunes-min, labelled with their file names."}
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fortune cookies of the Debian fortunes packages, labelled with their file "
                    "(category) names.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "category": tfds.features.ClassLabel(),  # Names set from the files found at build time.
        }),
        homepage="https://tracker.debian.org/pkg/fortune-mod",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    paths = fortune_paths()
    fortunes, self.skip_counts = read_fortunes(paths)
    if not fortunes:
      raise DataError(f"No fortune could be read from {FORTUNE_DIR}")
    self.info.features["category"].names = sorted({f.category for f in fortunes})
    splits = split_by_hash(fortunes, lambda f: f.text, TEST_PERCENT)
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, fortunes):
    for f in fortunes:
      yield f.key, {"text": f.text, "category": f.category}


registry.register(registry.Corpus(
    name="fortunes", builder=FortunesBuilder, kind="text", debian_packages=DEBIAN_PACKAGES,
    fields={"text": "text", "category": "class"}, probe=("text", "category")))
