"""Bible verse pairs: the King James Version and the World English Bible aligned by verse, as TFDS.

Sources (Debian packages, read with `pysword`): `sword-text-kjv` (SWORD module engKJV2006eb: the
1769 KJV text with Strong's numbers, KJV versification) and `sword-text-web` (engWEB2015eb: the World
English Bible with Deuterocanon, NRSVA versification).

Licence: both texts are in the public domain (Debian copyright files: "License: public-domain").
"World English Bible" is a trademark of eBible.org, which asks that a text whose words were changed
not be called the WEB; this builder only removes markup, footnotes and headings.

Cleaning: OSIS markup is removed; footnotes, cross-references, headings (psalm superscriptions and
acrostic letters included) and speaker labels are dropped with their content, as is any material
after a book's end marker (the WEB's glossary follows Revelation 22:21); pilcrows and stray USFM
markers ("\\nd") are removed and whitespace collapsed. A verse is kept only if its reference exists
in both modules and both texts are valid UTF-8 and non-empty after cleaning (the Deuterocanon,
present only in the WEB, drops out).

Features: `id` Text (OSIS reference, "Gen.1.1"), `book` Text (English name, "Genesis"), `kjv` Text,
`web` Text. Splits: `test` = every verse of the books in `TEST_BOOKS` (3,146 of 31,095 verses,
10.1%), `train` = the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import pathlib
import re
from collections.abc import Mapping

from pysword.modules import SwordModules
import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts

KJV_PACKAGE = "sword-text-kjv"
WEB_PACKAGE = "sword-text-web"
DEBIAN_PACKAGES = (KJV_PACKAGE, WEB_PACKAGE)
# Whole held-out books: history, wisdom, prophecy, a gospel and two letters (3,146 verses, ~10%).
TEST_BOOKS = ("Josh", "Prov", "Dan", "Mark", "Rom", "Jas")

# Elements dropped with their content: notes (footnotes, cross-references), headings, speakers.
_DROP_WITH_CONTENT = re.compile(r"<(note|title|speaker)\b[^>]*?(?:/>|>.*?</\1\s*>)", re.DOTALL)
# The milestone that closes a book: anything after it (e.g. a glossary) is not verse text.
_BOOK_END = re.compile(r"<div\b(?=[^>]*\beID=)(?=[^>]*\btype=\"book\")[^>]*/>")
# Structural elements that separate words; every other tag (w, q, transChange, ...) is inline.
_BLOCK_TAG = re.compile(r"</?(?:div|l|lg|lb|list|item|chapter|milestone|p|verse|table|row|cell|head)"
                        r"\b[^>]*>")
_ANY_TAG = re.compile(r"<[^>]*>")
# Stray USFM character markers left in a few KJV verses ("\\nd LORD" for the divine name).
_USFM_MARKER = re.compile(r"\\\+?[a-z]+[0-9]*\*?")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])")


@dataclasses.dataclass(frozen=True)
class Verse:
  """One aligned verse."""
  id: str  # "Gen.1.1"
  book: str  # "Genesis"
  kjv: str
  web: str


def clean_osis(text: str) -> str:
  """Returns the plain text of one verse of OSIS markup (see the module docstring)."""
  end = _BOOK_END.search(text)
  if end:
    text = text[:end.start()]
  text = _DROP_WITH_CONTENT.sub(" ", text)
  text = _BLOCK_TAG.sub(" ", text)
  text = _USFM_MARKER.sub(" ", _ANY_TAG.sub("", text))
  text = html.unescape(text).replace("\u00b6", " ")
  text = " ".join(text.split())
  return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def _module_name(conf: pathlib.Path) -> str:
  """The module name: the first `[Name]` line of a SWORD .conf file."""
  for line in conf.read_text(encoding="utf-8", errors="replace").splitlines():
    line = line.strip()
    if line.startswith("[") and line.endswith("]"):
      return line[1:-1]
  raise DataError(f"SWORD module configuration {conf} names no module (no [Name] line)")


def find_module(package: str) -> tuple[pathlib.Path, str]:
  """Returns (SWORD data directory, module name) of the module Debian `package` installs.

  Raises:
    DataError: the package is missing and cannot be installed, or holds no module .conf file.
  """
  confs = sorted(p for p in debian.ensure_package(package)
                 if p.parent.name == "mods.d" and p.suffix == ".conf" and p.is_file())
  if not confs:
    raise DataError(f"Debian package {package} has no SWORD module (no mods.d/*.conf); reinstall "
                    f"it with: sudo apt-get install --reinstall -y {package}")
  return confs[0].parent.parent, _module_name(confs[0])


def _open_raw(sword_dir: pathlib.Path, module: str):
  """Opens SWORD `module` with pysword so that verse texts come back as undecoded bytes."""
  modules = SwordModules(str(sword_dir))
  try:
    found = modules.parse_modules()
  except OSError as e:
    raise DataError(f"Cannot read SWORD modules in {sword_dir}: {e}") from e
  if module not in found:
    raise DataError(f"No SWORD module {module!r} in {sword_dir} (found: {sorted(found)})")
  try:
    bible = modules.get_bible_from_module(module)
  except (OSError, ValueError, KeyError) as e:
    raise DataError(f"Cannot open SWORD module {module!r} in {sword_dir}: {e}") from e
  if not hasattr(bible, "_decode_bytes"):
    raise DataError("Unsupported pysword version (no SwordBible._decode_bytes); install the pinned "
                    "one with: pip install pysword==0.2.8")
  # pysword decodes with errors="replace" (or falls back to cp1252); keep the bytes to count bad ones.
  bible._decode_bytes = bytes  # pylint: disable=protected-access
  if hasattr(bible, "_decompressed_text"):  # zText: every verse would decompress its whole block.
    cached = functools.lru_cache(maxsize=4)(bible._decompressed_text)  # pylint: disable=protected-access
    bible._decompressed_text = cached  # pylint: disable=protected-access
  return bible


def read_module(sword_dir: pathlib.Path, module: str) -> tuple[dict[str, bytes], dict[str, str]]:
  """Reads every verse of a SWORD Bible module.

  Args:
    sword_dir: the SWORD data directory (holding `mods.d/` and `modules/`).
    module: the module name, e.g. "engKJV2006eb".

  Returns:
    (verses, books): OSIS reference ("Gen.1.1") -> raw verse bytes (OSIS markup), in canonical
    order, for every verse the module has (its entry is not empty); OSIS book name -> English
    name ("Gen" -> "Genesis").

  Raises:
    DataError: the module is missing or cannot be read.
  """
  bible = _open_raw(sword_dir, module)
  verses: dict[str, bytes] = {}
  books: dict[str, str] = {}
  for testament in bible.get_structure().get_books().values():
    for book in testament:
      books[book.osis_name] = book.name
      for chapter, n in enumerate(book.chapter_lengths, start=1):
        texts = list(bible.get_iter(books=[book.osis_name], chapters=[chapter],
                                    verses=list(range(1, n + 1)), clean=False))
        if len(texts) != n:
          raise DataError(f"SWORD module {module!r} in {sword_dir}: {book.osis_name} {chapter} has "
                          f"{len(texts)} verse texts, its versification {n}")
        for verse, raw in enumerate(texts, start=1):
          raw = raw.encode() if isinstance(raw, str) else raw  # "" past the end of the index
          if raw.strip():  # SWORD stores a verse the module lacks as an empty entry.
            verses[f"{book.osis_name}.{chapter}.{verse}"] = raw
  return verses, books


def align_verses(kjv: Mapping[str, bytes], web: Mapping[str, bytes],
                 books: Mapping[str, str]) -> tuple[list[Verse], SkipCounts]:
  """Pairs the verses of two translations by reference (pure: no file access).

  Args:
    kjv, web: OSIS reference -> raw verse bytes (OSIS markup), as `read_module` returns.
    books: OSIS book name -> English name.

  Returns:
    (verses in `kjv` order, skips): references missing from `web` are left out uncounted; a pair
    with either text not UTF-8 counts as non-UTF-8, one with either text empty after cleaning
    (e.g. only a footnote saying the verse is omitted) as empty.
  """
  skips, out = SkipCounts(), []
  for ref, kjv_raw in kjv.items():
    if ref not in web:
      continue
    try:
      texts = [raw.decode("utf-8") for raw in (kjv_raw, web[ref])]
    except UnicodeDecodeError:
      skips.non_utf8 += 1
      continue
    kjv_text, web_text = (clean_osis(t) for t in texts)
    if not kjv_text or not web_text:
      skips.empty += 1
      continue
    book = ref.split(".", 1)[0]
    out.append(Verse(ref, books.get(book, book), kjv_text, web_text))
  return out, skips


def read_bible(kjv_source: tuple[pathlib.Path, str], web_source: tuple[pathlib.Path, str]
               ) -> tuple[list[Verse], SkipCounts]:
  """Reads and aligns two SWORD modules, each given as (SWORD data directory, module name)."""
  kjv, kjv_books = read_module(*kjv_source)
  web, web_books = read_module(*web_source)
  return align_verses(kjv, web, {**web_books, **kjv_books})


def is_test(verse: Verse) -> bool:
  """Whether `verse` belongs to the test split (its whole book is held out)."""
  return verse.id.split(".", 1)[0] in TEST_BOOKS


class BibleBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of KJV/WEB verse pairs from local Debian packages (no download)."""

  name = "big_embed_bible"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "KJV (engKJV2006eb) and WEB (engWEB2015eb) verses by reference."}
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Bible verses in the King James Version and the World English Bible, aligned "
                    "by reference; test = whole held-out books.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "book": tfds.features.Text(),
            "kjv": tfds.features.Text(),
            "web": tfds.features.Text(),
        }),
        homepage="https://ebible.org/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    verses, self.skip_counts = read_bible(find_module(KJV_PACKAGE), find_module(WEB_PACKAGE))
    if not verses:
      raise DataError(f"No verse is present in both {KJV_PACKAGE} and {WEB_PACKAGE}")
    return {
        "train": self._generate_examples([v for v in verses if not is_test(v)]),
        "test": self._generate_examples([v for v in verses if is_test(v)]),
    }

  def _generate_examples(self, verses):
    for v in verses:
      yield v.id, dataclasses.asdict(v)


registry.register(registry.Corpus(
    name="bible", builder=BibleBuilder, kind="text", debian_packages=DEBIAN_PACKAGES,
    fields={"id": "text", "book": "text", "kjv": "text", "web": "text"}, retrieval=("kjv", "web")))
