"""WordNet 3.0 synsets (lemmas, definition, usage examples, lexicographer file) as a TFDS builder.

Source (Debian package): `wordnet-base`, the WordNet 3.0 database files
/usr/share/wordnet/data.{noun,verb,adj,adv} (format: wndb(5WN)).

Licence: the WordNet 3.0 licence (Princeton University): use, copy, modify and distribute for any
purpose without fee, provided the copyright notice "WordNet 3.0 Copyright 2006 by Princeton
University. All rights reserved." and the licence's disclaimer appear on all copies (see
/usr/share/doc/wordnet-base/copyright).

Parsing: each synset's gloss is split at semicolons outside double quotes; quoted parts are usage
examples (each double-quoted string; the quotes and any attribution outside them dropped), the
rest joined with "; " is the definition. Lemmas have underscores replaced by spaces and adjective
position markers ("(a)", "(p)", "(ip)") removed. Synsets whose line is not UTF-8, or whose
definition is empty, are skipped.

Features: `id` Text ("<ss_type>.<offset>", e.g. "n.02084071"; ss_type is n, v, a, s (adjective
satellite) or r), `lemmas` Sequence(Text), `definition` Text, `examples` Sequence(Text), `lexname`
ClassLabel over `LEXNAMES` (the 45 lexicographer files, in file-number order, lexnames(5WN)).
Splits: a synset is in `test` iff sha1(id) mod 100 < 10 (about 10%), else in `train`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Sequence

import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError
from big_embed.data.text_corpus import SkipCounts, decode_utf8, split_by_hash

DEBIAN_PACKAGE = "wordnet-base"
DEBIAN_PACKAGES = (DEBIAN_PACKAGE,)
DATA_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
TEST_PERCENT = 10
# lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl")
_SS_TYPES = frozenset("nvasr")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_QUOTED = re.compile(r'"([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Synset:
  """One WordNet synset."""
  id: str
  lemmas: tuple[str, ...]
  definition: str
  examples: tuple[str, ...]
  lexname: str


def _split_outside_quotes(gloss: str) -> list[str]:
  """Splits `gloss` at semicolons that are not inside a double-quoted example."""
  parts, current, quoted = [], [], False
  for ch in gloss:
    if ch == '"':
      quoted = not quoted
    if ch == ";" and not quoted:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  parts.append("".join(current))
  return [p.strip() for p in parts if p.strip()]


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
  """Returns (definition, examples) of a WordNet gloss.

  e.g. 'a member of the genus Canis; occurs in many breeds; "the dog barked all night"' ->
  ('a member of the genus Canis; occurs in many breeds', ('the dog barked all night',)).
  """
  definition, examples = [], []
  for part in _split_outside_quotes(gloss):
    if part.startswith('"'):
      # Usually one quoted example; a few glosses join several with ":" or ",".
      quoted = _QUOTED.findall(part) or [part[1:]]
      examples.extend(q.strip() for q in quoted if q.strip())
    else:
      definition.append(part)
  return "; ".join(definition), tuple(examples)


def _lemma(word: str) -> str:
  return _ADJ_MARKER.sub("", word).replace("_", " ")


def parse_data_line(line: str, where: str) -> tuple[str, tuple[str, ...], str, str]:
  """Parses one synset line of a data.* file into (id, lemmas, gloss, lexname).

  Raises:
    DataError: the line is malformed; the message names `where` (file and line number).
  """
  head, _, gloss = line.partition(" | ")
  fields = head.split()
  try:
    offset, lex_filenum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    words = fields[4:4 + 2 * w_cnt:2]
    if (len(offset) != 8 or not offset.isdigit() or ss_type not in _SS_TYPES
        or len(words) != w_cnt or w_cnt == 0):
      raise ValueError("bad synset header")
    lexname = LEXNAMES[lex_filenum]
  except (IndexError, ValueError) as e:
    raise DataError(f"Malformed WordNet synset at {where} ({e}): {line[:80]!r}. The file is "
                    f"damaged; reinstall it with: sudo apt-get install --reinstall -y "
                    f"{DEBIAN_PACKAGE}") from e
  return f"{ss_type}.{offset}", tuple(_lemma(w) for w in words), gloss.strip(), lexname


def read_wordnet(paths: Sequence[pathlib.Path]) -> tuple[list[Synset], SkipCounts]:
  """Reads WordNet data files (data.noun, ...) into synsets, in file order.

  Licence header lines (starting with two spaces) are not records. A line that is not UTF-8 or
  whose definition is empty is skipped and counted.

  Raises:
    DataError: a file cannot be read, or a synset line is malformed.
  """
  skips, out = SkipCounts(), []
  for path in paths:
    try:
      data = path.read_bytes()
    except OSError as e:
      raise DataError(f"Cannot read WordNet file {path}: {e}") from e
    for number, raw in enumerate(data.splitlines(), start=1):
      if raw.startswith(b"  ") or not raw.strip():
        continue
      line = decode_utf8(raw, skips)
      if line is None:
        continue
      synset_id, lemmas, gloss, lexname = parse_data_line(line, f"{path}:{number}")
      definition, examples = split_gloss(gloss)
      if not definition:
        skips.empty += 1
        continue
      out.append(Synset(synset_id, lemmas, definition, examples, lexname))
  return out, skips


def data_paths() -> list[pathlib.Path]:
  """The installed data.* files (installing `wordnet-base` if allowed)."""
  return [debian.package_file(DEBIAN_PACKAGE, f"/{name}") for name in DATA_FILES]


class WordNetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of WordNet 3.0 synsets from the local Debian package (no download)."""

  name = "big_embed_wordnet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "WordNet 3.0 synsets: lemmas, definition, examples, lexname."}
  skip_counts: SkipCounts | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="WordNet 3.0 synsets with their lemmas, definitions, usage examples and "
                    "lexicographer file names.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "lemmas": tfds.features.Sequence(tfds.features.Text()),
            "definition": tfds.features.Text(),
            "examples": tfds.features.Sequence(tfds.features.Text()),
            "lexname": tfds.features.ClassLabel(names=LEXNAMES),
        }),
        homepage="https://wordnet.princeton.edu/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    synsets, self.skip_counts = read_wordnet(data_paths())
    if not synsets:
      raise DataError(f"No synset found in the WordNet files of {DEBIAN_PACKAGE}")
    splits = split_by_hash(synsets, lambda s: s.id, TEST_PERCENT)
    return {name: self._generate_examples(records) for name, records in splits.items()}

  def _generate_examples(self, synsets):
    for s in synsets:
      yield s.id, {"id": s.id, "lemmas": list(s.lemmas), "definition": s.definition,
                   "examples": list(s.examples), "lexname": s.lexname}


registry.register(registry.Corpus(
    name="wordnet", builder=WordNetBuilder, kind="text", debian_packages=DEBIAN_PACKAGES,
    fields={"id": "text", "lemmas": "text_seq", "definition": "text", "examples": "text_seq", "lexname": "class"},
    retrieval=("definition", "lemmas"), probe=("definition", "lexname")))

