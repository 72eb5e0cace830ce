"""Tests of the text corpora: readers on crafted files in the real formats, skip counting, splits,
missing sources, real builds read back through `sources.open_split`, and a new corpus added as one module."""

import gzip
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import types
import zlib

import ml_collections
import numpy as np
import pytest

from big_embed import config_utils
from big_embed.data import DataError, build, corpora, debian, sources, text_corpus, text_stream, text_tasks
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.corpora import bible, debian_packages, foldoc, fortunes, gensim_pairs, wordnet
from big_embed.evaluate import registry as eval_registry


def _naive_is_test(key, percent):
  """Reference split rule: the first 16 hex digits of sha1(key), mod 100."""
  return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) % 100 < percent


def _all_records(name, data_dir, split):
  src = sources.open_split(name, data_dir, split)
  return src.__getitems__(range(len(src)))


# Shared split rule.

def test_hash_split_is_deterministic_disjoint_and_sized():
  keys = [f"key-{i}" for i in range(5_000)]
  splits = text_corpus.split_by_hash(keys, lambda k: k, 10)
  reordered = text_corpus.split_by_hash(list(reversed(keys)), lambda k: k, 10)
  assert {s: sorted(v) for s, v in reordered.items()} == {s: sorted(v) for s, v in splits.items()}
  assert set(splits["train"]).isdisjoint(splits["test"])
  assert sorted(splits["train"] + splits["test"]) == sorted(keys)
  assert splits["test"] == [k for k in keys if _naive_is_test(k, 10)]
  assert 0.08 < len(splits["test"]) / len(keys) < 0.12


def test_skip_counts_message():
  skips = text_corpus.SkipCounts(empty=3) + text_corpus.SkipCounts(non_utf8=1)
  assert skips.message("fortunes") == "fortunes: skipped 3 empty and 1 non-UTF-8 records"


# Bible.

def _write_ztext_module(root, module, versification, verses):
  """Writes a SWORD zText module (one zlib block per testament) holding `verses` {ref: bytes}."""
  from pysword.books import BibleStructure  # pylint: disable=g-import-not-at-top
  structure = BibleStructure(versification.lower(), ["ot", "nt"])
  entries = {"ot": {}, "nt": {}}
  for ref, text in verses.items():
    book, chapter, verse = ref.split(".")
    (testament, (index,)), = structure.ref_to_indicies(
        books=[book], chapters=[int(chapter)], verses=[int(verse)]).items()
    entries[testament][index] = text
  rel = f"modules/texts/ztext/{module.lower()}/"
  (root / rel).mkdir(parents=True)
  for testament, texts in entries.items():
    block, index_records = b"", []
    for index in range(max(texts, default=-1) + 1):
      text = texts.get(index, b"")
      index_records.append(struct.pack("<IIH", 0, len(block), len(text)))
      block += text
    compressed = zlib.compress(block)
    (root / rel / f"{testament}.bzv").write_bytes(b"".join(index_records))
    (root / rel / f"{testament}.bzs").write_bytes(struct.pack("<III", 0, len(compressed), len(block)))
    (root / rel / f"{testament}.bzz").write_bytes(compressed)
  (root / "mods.d").mkdir(exist_ok=True)
  (root / "mods.d" / f"{module.lower()}.conf").write_text(
      f"[{module}]\nDataPath=./{rel}\nModDrv=zText\nSourceType=OSIS\nEncoding=UTF-8\n"
      f"CompressType=ZIP\nBlockType=BOOK\nVersification={versification}\n")


def test_clean_osis():
  raw = ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><title canonical="true" '
         'type="psalm">A Psalm.</title> <lg sID="g1"/> <l level="1" sID="g2"/>In the <w lemma="'
         'strong:H7225">beginning</w>, God<note placement="foot"><reference type="annotateRef">1:1 '
         '</reference>Hebrew “Elohim”.</note><w>created</w> \u00b6 the <transChange type="added">'
         'heavens</transChange>&amp;the \\nd <divineName>LORD</divineName>\\+nd* .<l eID="g2"/>'
         '<chapter eID="Gen.1"/> <div eID="b" osisID="Gen" type="book"/> <title>Glossary</title>'
         ' Appendix text.')
  assert bible.clean_osis(raw) == "In the beginning, God created the heavens&the LORD."


def test_bible_reader_on_crafted_modules(tmp_path):
  kjv_dir, web_dir = tmp_path / "kjv", tmp_path / "web"
  _write_ztext_module(kjv_dir, "TestKJV", "KJV", {
      "Gen.1.1": b"In the <w>beginning</w> God created the heaven and the earth.",
      "Gen.1.2": b"And the earth was without form\xff.",  # Not UTF-8.
      "Gen.1.3": b"And God said, Let there be light.",
      "Matt.1.1": b"The book of the generation of Jesus Christ.",
      "Mark.1.1": b"The beginning of the gospel.",
  })
  _write_ztext_module(web_dir, "TestWEB", "NRSVA", {
      "Gen.1.1": b"In the beginning, God<note>a footnote</note>created the heavens and the earth.",
      "Gen.1.2": b"The earth was formless and empty.",
      "Gen.1.3": b'<note placement="foot">Some manuscripts add this verse.</note>',  # Empty.
      "Matt.1.1": b"The book of the genealogy of Jesus Christ.",
      "Mark.1.1": b"The beginning of the Good News.",
      "Tob.1.1": b"The book of the words of Tobit.",  # Deuterocanon: no KJV counterpart.
  })
  verses, skips = bible.read_bible((kjv_dir, "TestKJV"), (web_dir, "TestWEB"))
  assert verses == [
      bible.Verse("Gen.1.1", "Genesis", "In the beginning God created the heaven and the earth.",
                  "In the beginning, God created the heavens and the earth."),
      bible.Verse("Matt.1.1", "Matthew", "The book of the generation of Jesus Christ.",
                  "The book of the genealogy of Jesus Christ."),
      bible.Verse("Mark.1.1", "Mark", "The beginning of the gospel.",
                  "The beginning of the Good News."),
  ]
  assert skips == text_corpus.SkipCounts(empty=1, non_utf8=1)
  assert [bible.is_test(v) for v in verses] == [False, False, True]  # Mark is a held-out book.


def test_bible_missing_module(tmp_path):
  _write_ztext_module(tmp_path, "TestKJV", "KJV", {"Gen.1.1": b"In the beginning."})
  with pytest.raises(DataError, match="No SWORD module 'Other'"):
    bible.read_module(tmp_path, "Other")


# WordNet.

_WN_HEADER = (b"  1 This software and database is being provided to you, the LICENSEE, by  \n"
              b"  2 Princeton University under the following license.  \n")


def test_wordnet_reader_on_crafted_files(tmp_path):
  eleven = " ".join(f"w{i} 0" for i in range(11))
  noun = tmp_path / "data.noun"
  noun.write_bytes(
      _WN_HEADER
      + b"02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member "
        b"of the genus Canis; occurs in many breeds; \"the dog barked; all night\"  \n"
      + b"00000001 03 n 01 thing 0 000 | \"only an example\"  \n"  # No definition: skipped.
      + b"00000002 03 n 01 caf\xe9 0 000 | not UTF-8  \n"
      + f"00000003 06 n 0b {eleven} 000 | eleven lemmas (hex count)  \n".encode())
  adj = tmp_path / "data.adj"
  adj.write_bytes(
      _WN_HEADER
      + b"00019731 00 s 02 handy 0 ready_to_hand(p) 0 001 & 00019131 a 0000 | easy to reach; "
        b"\"found a handy spot\"; \"the stars\" - Shakespeare; \"one\": \"two\"  \n")
  synsets, skips = wordnet.read_wordnet([noun, adj])
  assert synsets == [
      wordnet.Synset("n.02084071", ("dog", "domestic dog", "Canis familiaris"),
                     "a member of the genus Canis; occurs in many breeds",
                     ("the dog barked; all night",), "noun.animal"),
      wordnet.Synset("n.00000003", tuple(f"w{i}" for i in range(11)), "eleven lemmas (hex count)",
                     (), "noun.artifact"),
      wordnet.Synset("s.00019731", ("handy", "ready to hand"), "easy to reach",
                     ("found a handy spot", "the stars", "one", "two"), "adj.all"),
  ]
  assert skips == text_corpus.SkipCounts(empty=1, non_utf8=1)
  assert len(wordnet.LEXNAMES) == 45 and wordnet.LEXNAMES[44] == "adj.ppl"


def test_wordnet_malformed_line(tmp_path):
  path = tmp_path / "data.verb"
  path.write_bytes(_WN_HEADER + b"garbage | a gloss\n")
  with pytest.raises(DataError, match=r"Malformed WordNet synset at .*data.verb:3"):
    wordnet.read_wordnet([path])


# Debian packages.

_PACKAGES_MAIN = b"""Package: alpha
Version: 1.0-1
Section: games
Description: Alpha game
Description-md5: aaa1
Tag: game::strategy, interface::x11,
 role::program

Package: beta
Version: 2.0
Section: contrib/utils
Description: Beta tool
Description-md5: bbb1

Package: gamma
Version: 1
Section: text
Description: Gamma, described inline
 First line
 continues here.
 .
  verbatim line
   deeper

Package: delta
Version: 1
Section: misc
Description: Delta has no translation
Description-md5: ddd1
"""

_PACKAGES_SECURITY = b"""Package: alpha
Version: 1.0-1+deb12u1
Section: games
Description: Alpha game
Description-md5: aaa2

Package: bad
Version: 1
Description: caf\xe9

Package: beta
Version: 1:0.5
Section: contrib/utils
Description: Beta tool
Description-md5: bbb2
"""

_TRANSLATION = b"""Package: alpha
Description-md5: aaa1
Description-en: Alpha game
 Old text.

Package: alpha
Description-md5: aaa2
Description-en: Alpha game
 New text, line one
 line two.
 .
 Second paragraph.

Package: beta
Description-md5: bbb1
Description-en: Beta tool
 Beta without epoch.

Package: beta
Description-md5: bbb2
Description-en: Beta tool (epoch)
 Beta with an epoch.
"""


def test_apt_index_reader_on_crafted_lists():
  packages, skips = debian_packages.read_apt_index([_PACKAGES_MAIN, _PACKAGES_SECURITY],
                                                   [_TRANSLATION])
  assert packages == [
      # The newest version's description; the tags of the only version that has some.
      debian_packages.Package("alpha", "Alpha game", "New text, line one line two.\n\nSecond "
                              "paragraph.", "games", ("game::strategy", "interface::x11",
                                                      "role::program")),
      # Epoch 1 beats 2.0; the "contrib/" prefix is dropped.
      debian_packages.Package("beta", "Beta tool (epoch)", "Beta with an epoch.", "utils", ()),
      debian_packages.Package("gamma", "Gamma, described inline",
                              "First line continues here.\n\nverbatim line\n deeper", "text", ()),
  ]
  assert skips == text_corpus.SkipCounts(empty=1, non_utf8=1)  # delta; the stanza of "bad".


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg as the reference")
def test_version_order_matches_dpkg():
  pairs = [("1.0", "1.0-1"), ("1.0~rc1", "1.0"), ("1:0.5", "2.0"), ("1.0-1+deb12u1", "1.0-1"),
           ("2.10", "2.9"), ("1.0a", "1.0+"), ("1.0", "1.0.0"), ("0.0.26-3", "0.0.26-3"),
           ("1.2.3~", "1.2.3"), ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12"), ("1.0-1~bpo1", "1.0-1"),
           ("2:1.0", "1:9.9"), ("1.0.0+dfsg", "1.0.0"), ("1.02", "1.2"), ("a", "~a")]
  for a, b in pairs:
    for op, expected in (("lt", lambda c: c < 0), ("eq", lambda c: c == 0), ("gt", lambda c: c > 0)):
      dpkg = subprocess.run(["dpkg", "--compare-versions", a, op, b], check=False).returncode == 0
      assert expected(debian_packages.compare_versions(a, b)) == dpkg, (a, op, b)


def test_apt_list_files_compressed(tmp_path):
  (tmp_path / "x_main_binary-amd64_Packages.gz").write_bytes(gzip.compress(_PACKAGES_MAIN))
  (tmp_path / "x_main_i18n_Translation-en").write_bytes(_TRANSLATION)
  if shutil.which("lz4"):
    plain = tmp_path / "y_security_binary-amd64_Packages"
    plain.write_bytes(_PACKAGES_SECURITY)
    subprocess.run(["lz4", "-q", str(plain), f"{plain}.lz4"], check=True)
    plain.unlink()
  packages, _ = debian_packages.read_index(tmp_path, may_update=False)
  alpha = next(p for p in packages if p.package == "alpha")
  expected = "New text, line one line two.\n\nSecond paragraph." if shutil.which("lz4") else (
      "Old text.")
  assert alpha.description == expected


def test_missing_translations_name_the_command(tmp_path, monkeypatch):
  (tmp_path / "x_main_binary-amd64_Packages").write_bytes(_PACKAGES_MAIN)
  monkeypatch.setattr(debian_packages, "LISTS_DIR", tmp_path)
  monkeypatch.setattr(os, "geteuid", lambda: 1000)  # Not root: never runs apt-get.
  with pytest.raises(DataError, match=re.escape("sudo apt-get update -o Acquire::Languages=en")):
    build.prepare_dataset("debian_packages", tmp_path / "data")
  assert not sources.is_prepared("debian_packages", tmp_path / "data")


def test_missing_translations_as_root_runs_apt_update(tmp_path, monkeypatch):
  (tmp_path / "x_main_binary-amd64_Packages").write_bytes(_PACKAGES_MAIN)
  calls = []
  monkeypatch.setattr(os, "geteuid", lambda: 0)
  monkeypatch.setattr(debian_packages.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
  monkeypatch.setattr(debian_packages.subprocess, "run",
                      lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
  with pytest.raises(DataError, match="Translation-en"):
    debian_packages.index_files(tmp_path)
  assert calls == [["apt-get", "update", "-o", "Acquire::Languages=en"]]


# Fortunes.

def test_fortune_reader_on_crafted_files(tmp_path):
  (tmp_path / "science").write_bytes(
      b"E = mc^2\n%\n  /\\_/\\\n ( o.o )\n%\n%\n   \n%\nThe sky is\nblue \xff\n%\n"
      b"Last one.\n%\n")
  (tmp_path / "wisdom").write_bytes(b"Know thyself.\n%\n\nSpaced out.\n\n")
  fortunes_, skips = fortunes.read_fortunes([tmp_path / "science", tmp_path / "wisdom"])
  assert [(f.text, f.category) for f in fortunes_] == [
      ("E = mc^2", "science"), ("  /\\_/\\\n ( o.o )", "science"), ("Last one.", "science"),
      ("Know thyself.", "wisdom"), ("Spaced out.", "wisdom")]
  assert skips == text_corpus.SkipCounts(empty=2, non_utf8=1)
  assert len({f.key for f in fortunes_}) == len(fortunes_)


def test_fortune_file_selection(tmp_path):
  assert fortunes.is_fortune_file(fortunes.pathlib.Path("/usr/share/games/fortunes/science")) == (
      os.path.isfile("/usr/share/games/fortunes/science"))
  for name in ("science.dat", "science.u8", "off/science"):
    assert not fortunes.is_fortune_file(fortunes.pathlib.Path(fortunes.FORTUNE_DIR + name))


def test_prepare_prints_skip_counts(tmp_path, monkeypatch, capsys):
  crafted = tmp_path / "src"
  crafted.mkdir()
  (crafted / "alpha").write_bytes(b"One.\n%\n\n%\nTwo \xfe.\n%\nThree.\n%\n  \n%\n")
  (crafted / "beta").write_bytes(b"Four.\n%\n%\nFive.\n")
  monkeypatch.setattr(fortunes, "fortune_paths", lambda: sorted(crafted.iterdir()))
  monkeypatch.setattr(debian, "ensure_package", lambda package: [])  # Sources are the crafted files.
  assert build.prepare_dataset("fortunes", tmp_path / "data")
  assert "fortunes: skipped 3 empty and 1 non-UTF-8 records" in capsys.readouterr().out
  names = sources.make_builder("fortunes", tmp_path / "data").info.features["category"].names
  assert names == ["alpha", "beta"]
  got = {(r["text"].decode(), names[r["category"]]) for split in ("train", "test")
         for r in _all_records("fortunes", tmp_path / "data", split)}
  assert got == {("One.", "alpha"), ("Three.", "alpha"), ("Four.", "beta"), ("Five.", "beta")}


# FOLDOC.

def _b64(n):
  digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  out = digits[n % 64]
  while n >= 64:
    n //= 64
    out = digits[n % 64] + out
  return out


def _write_dictd(tmp_path, entries):
  """Writes foldoc.index / foldoc.dict.dz; `entries` is [(headwords, text bytes)]."""
  data, lines = b"", []
  for headwords, text in entries:
    for headword in headwords:
      lines.append(f"{headword}\t{_b64(len(data))}\t{_b64(len(text))}\n")
    data += text
  (tmp_path / "foldoc.index").write_text("".join(sorted(lines)))
  (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(data))
  return tmp_path / "foldoc.index", tmp_path / "foldoc.dict.dz"


def test_b64_numbers():
  assert [foldoc.decode_b64_number(s) for s in ("A", "/", "BA", "Gb9L")] == [
      0, 63, 64, 6 * 64**3 + 27 * 64**2 + 61 * 64 + 11]
  assert all(foldoc.decode_b64_number(_b64(n)) == n for n in (0, 1, 63, 64, 4095, 5_578_809))
  with pytest.raises(ValueError):
    foldoc.decode_b64_number("a-b")


def test_foldoc_reader_on_crafted_files(tmp_path):
  unix = (b"Unix\nUNIX System\n\n   <operating system, history> An {operating system} from {Bell\n"
          b"   Labs (http://bell-labs.com/)}, see\n   {POSIX}.\n\n   Example:\n\n"
          b"    int main() { return 0; }\n      <b>not a category</b>\n\n   (2001-02-03)\n\n")
  entries = [
      (["00-database-short"], b"00-database-short\n     Test dictionary\n"),
      (["unix", "unix system"], unix),
      (["pal"], (b"PAL\n\n   1. <language> Paradox Application Language.\n\n   2. <television> "
                 b"{phase alternating line}.\n\n   <jones@example.com> wrote it.\n\n")),
      (["bad"], b"Bad\n\n   <jargon> caf\xe9.\n\n"),
      (["nothing"], b"Nothing\n\n   (1999-01-01)\n\n"),
  ]
  got, skips = foldoc.read_foldoc(*_write_dictd(tmp_path, entries))
  assert got == [
      foldoc.Entry("Unix", "An operating system from Bell Labs, see POSIX.\n\nExample:\n\n"
                   " int main() { return 0; }\n   <b>not a category</b>",
                   ("operating system", "history")),
      foldoc.Entry("PAL", "1. Paradox Application Language.\n\n2. phase alternating line.\n\n"
                   "<jones@example.com> wrote it.", ("language", "television")),
  ]
  assert skips == text_corpus.SkipCounts(empty=1, non_utf8=1)


def test_foldoc_index_past_the_end(tmp_path):
  index, dict_path = _write_dictd(tmp_path, [(["a"], b"A\n\n   text\n")])
  index.write_text(f"b\t{_b64(5)}\t{_b64(400)}\n")
  with pytest.raises(DataError, match=r"Malformed dictd index line .*foldoc.index:1"):
    foldoc.read_foldoc(index, dict_path)


# Similarity sets.

def test_word_pairs_reader():
  data = (b"# The Test Collection\n# Word 1\tWord 2\tHuman (mean)\nold\tnew\t1.58\n"
          b"\tempty\t3\ncaf\xe9\tbar\t2\nsmart\tintelligent\t9.2\n\n")
  pairs, skips = gensim_pairs.read_word_pairs(data, "crafted")
  assert pairs == [gensim_pairs.Pair("old", "new", 1.58),
                   gensim_pairs.Pair("smart", "intelligent", 9.2)]
  assert skips == text_corpus.SkipCounts(empty=1, non_utf8=1)
  with pytest.raises(DataError, match="crafted:1"):
    gensim_pairs.read_word_pairs(b"a\tb\tnot-a-number\n", "crafted")


def test_lee_reader():
  corpus = "Doc zero.\nDoc \xe9t\xe9 one.\nDoc two.\n".encode("latin-1")
  matrix = b"1 0.2 0.3\n0 1 0.6\n0 0 1\n"
  pairs, skips = gensim_pairs.read_lee(corpus, matrix)
  assert pairs == [gensim_pairs.Pair("Doc zero.", "Doc \xe9t\xe9 one.", 0.2),
                   gensim_pairs.Pair("Doc zero.", "Doc two.", 0.3),
                   gensim_pairs.Pair("Doc \xe9t\xe9 one.", "Doc two.", 0.6)]
  assert skips == text_corpus.SkipCounts()
  pairs, skips = gensim_pairs.read_lee(b"A.\n\nC.\n", matrix)
  assert [(p.text_a, p.text_b) for p in pairs] == [("A.", "C.")] and skips.empty == 2
  with pytest.raises(DataError, match=r"shape \(2, 3\)"):
    gensim_pairs.read_lee(corpus, b"1 0 0\n0 1 0\n")


def test_wheel_download_failure(tmp_path, monkeypatch):
  monkeypatch.setattr(gensim_pairs.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 1, "", "ERROR: No matching distribution found for gensim==4.4.0\n"))
  with pytest.raises(DataError, match=r"No matching distribution.*pip download --no-deps"):
    gensim_pairs.download_wheel(tmp_path)


def test_wheel_hash_mismatch(tmp_path, monkeypatch):
  def fake_pip(cmd, **kw):
    (tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"not it")
    return subprocess.CompletedProcess(cmd, 0, "", "")
  monkeypatch.setattr(gensim_pairs.subprocess, "run", fake_pip)
  with pytest.raises(DataError, match="SHA-256"):
    gensim_pairs.download_wheel(tmp_path)


# Missing sources.

@pytest.mark.parametrize("name, package", [("bible", "sword-text-kjv"), ("wordnet", "wordnet-base"),
                                           ("fortunes", "fortunes"), ("foldoc", "dict-foldoc")])
def test_missing_package_gives_the_install_command(name, package, tmp_path, monkeypatch):
  monkeypatch.setattr(debian, "_installed_files", lambda p: None)  # As if nothing were installed.
  monkeypatch.setattr(os, "geteuid", lambda: 1000)  # Not root: never runs apt-get.
  with pytest.raises(DataError, match=f"Debian package {package} is missing; install it with: "
                                      f"sudo apt-get install -y {package}"):
    build.prepare_dataset(name, tmp_path)
  assert not sources.is_prepared(name, tmp_path)


def test_unprepared_text_dataset_names_its_command(tmp_path):
  with pytest.raises(DataError, match=re.escape(f"prepare foldoc --data_dir {tmp_path}")):
    sources.open_split("foldoc", tmp_path, "train")


# Real builds.

def test_real_build_fortunes_and_wordsim353(tmp_path, capsys):
  build.prepare(["fortunes", "wordsim353"], tmp_path)
  out = capsys.readouterr().out
  assert re.search(r"fortunes: skipped \d+ empty and \d+ non-UTF-8 records", out)
  assert not (tmp_path / "tokenizer.json").exists()  # Text corpora do not touch the tokenizer.
  names = sources.make_builder("fortunes", tmp_path).info.features["category"].names
  splits = {s: [(r["text"].decode(), names[r["category"]])
                for r in _all_records("fortunes", tmp_path, s)] for s in ("train", "test")}
  # Reference: the installed files split naively at "%" lines.
  expected = set()
  for path in fortunes.fortune_paths():
    for record in re.split(r"(?m)^%$\n?", path.read_bytes().decode("utf-8")):
      if record.strip():
        expected.add((record.strip(), path.name))
  got = splits["train"] + splits["test"]
  assert {(text.strip(), cat) for text, cat in got} == expected
  train_texts, test_texts = ({t for t, _ in splits[s]} for s in ("train", "test"))
  assert train_texts.isdisjoint(test_texts)
  assert all(_naive_is_test(t, fortunes.TEST_PERCENT) for t in test_texts)
  assert 0.15 < len(splits["test"]) / len(got) < 0.25
  records = _all_records("wordsim353", tmp_path, "test")
  assert len(records) == 353  # One pair, money/cash, is listed twice.
  pairs = {(r["text_a"].decode(), r["text_b"].decode()): float(r["score"]) for r in records}
  assert pairs[("tiger", "cat")] == pytest.approx(7.35)
  assert pairs[("love", "sex")] == pytest.approx(6.77)
  with pytest.raises(DataError, match="no split 'train'; its splits: test"):
    sources.open_split("wordsim353", tmp_path, "train")


@pytest.mark.slow
def test_all_text_corpora(text_data_dir):
  """Every corpus of the session build: sizes, the split rules, known records."""
  def read(name, split, limit=None):
    src = sources.open_split(name, text_data_dir, split)
    return src.__getitems__(range(len(src) if limit is None else min(limit, len(src))))

  counts = {name: sum(len(sources.open_split(name, text_data_dir, s))
                      for s in sources.make_builder(name, text_data_dir).info.splits)
            for name in corpora.names("text")}
  assert counts["wordnet"] == 117_659  # WordNet 3.0 has 117,659 synsets.
  assert 30_000 < counts["bible"] <= 31_102  # The KJV has 31,102 verses.
  assert counts["fortunes"] > 10_000 and counts["foldoc"] > 10_000
  assert counts["debian_packages"] > 1_000
  assert (counts["lee50"], counts["wordsim353"], counts["simlex999"]) == (1225, 353, 999)
  for name in corpora.names("text"):
    assert tuple(sources.make_builder(name, text_data_dir).info.splits) == corpora.get(name).splits, name
  for name, field, percent in (("wordnet", "id", 10), ("debian_packages", "package", 10),
                               ("foldoc", "term", 10), ("fortunes", "text", 20)):
    # Reading every record of the large corpora takes a minute: the first 3,000 of each split.
    train, test = ([r[field].decode() for r in read(name, s, 3_000)] for s in ("train", "test"))
    assert all(_naive_is_test(k, percent) for k in test), name
    assert not any(_naive_is_test(k, percent) for k in train), name
    assert 0.7 * percent < 100 * len(sources.open_split(name, text_data_dir, "test")) / (
        counts[name]) < 1.3 * percent, name

  verses = {s: read("bible", s) for s in ("train", "test")}
  assert {r["id"].decode().split(".")[0] for r in verses["test"]} == set(bible.TEST_BOOKS)
  assert not {r["id"].decode().split(".")[0] for r in verses["train"]} & set(bible.TEST_BOOKS)
  assert 0.08 < len(verses["test"]) / counts["bible"] < 0.12
  by_id = {r["id"].decode(): r for r in verses["train"]}
  assert by_id["Gen.1.1"]["kjv"] == b"In the beginning God created the heaven and the earth."
  assert by_id["Gen.1.1"]["web"] == b"In the beginning, God created the heavens and the earth."
  assert by_id["Gen.1.1"]["book"] == b"Genesis"

  lexnames = sources.make_builder("wordnet", text_data_dir).info.features["lexname"].names
  cat = next(r for r in read("wordnet", "test") if r["id"] == b"n.02121808")
  assert [x.decode() for x in cat["lemmas"]] == ["domestic cat", "house cat", "Felis domesticus",
                                                 "Felis catus"]
  assert cat["definition"] == b"any domesticated member of the genus Felis"
  assert lexnames[cat["lexname"]] == "noun.animal"

  unix = next(r for s in ("train", "test") for r in read("foldoc", s) if r["term"] == b"Unix")
  assert list(unix["categories"]) == [b"operating system"]


# A new corpus is one module.

TOY_MODULE = '''
"""A toy glossary corpus: "term<TAB>definition<TAB>topic" lines of a local file."""

import pathlib

import tensorflow_datasets as tfds

from big_embed.data import text_corpus
from big_embed.data.corpora import registry

SOURCE = {source!r}
TOPICS = ("animals", "plants", "tools")


class ToyGlossaryBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  name = "big_embed_test_toy_glossary"
  VERSION = tfds.core.Version("1.0.0")
  skip_counts = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({{
        "term": tfds.features.Text(), "definition": tfds.features.Text(),
        "topic": tfds.features.ClassLabel(names=TOPICS)}}))

  def _split_generators(self, dl_manager):
    del dl_manager
    skips, entries = text_corpus.SkipCounts(), []
    for raw in pathlib.Path(SOURCE).read_bytes().split(b"\\n"):
      line = text_corpus.decode_utf8(raw, skips)
      if line is None:
        continue
      term, definition, topic = (line.split("\\t") + ["", "", ""])[:3]
      if not term.strip() or not definition.strip():
        skips.empty += 1
        continue
      entries.append((term.strip(), definition.strip(), topic.strip()))
    self.skip_counts = skips
    splits = text_corpus.split_by_hash(entries, lambda e: e[0], 30)
    return {{name: self._generate_examples(records) for name, records in splits.items()}}

  def _generate_examples(self, entries):
    for term, definition, topic in entries:
      yield term, {{"term": term, "definition": definition, "topic": topic}}


registry.register(registry.Corpus(
    name="toy_glossary", builder=ToyGlossaryBuilder, kind="text",
    fields={{"term": "text", "definition": "text", "topic": "class"}},
    retrieval=("definition", "term"), probe=("definition", "topic")))
'''
WORDS = ["otter", "heron", "maple", "fern", "chisel", "auger", "badger", "willow", "trowel", "falcon", "clover",
         "anvil"]


def _toy_entries():
  """(term, definition, topic) of the toy source; topic i % 3."""
  topics = ("animals", "plants", "tools")
  return [(f"{WORDS[i % 12]} {WORDS[(5 * i + 1) % 12]} {i}", f"entry {i} describes a {WORDS[(7 * i + 3) % 12]} thing",
           topics[i % 3]) for i in range(60)]


@pytest.fixture
def toy_corpus(tmp_path, monkeypatch):
  """The toy corpus module written to a directory outside the package and imported (it registers itself)."""
  source = tmp_path / "glossary.tsv"
  lines = [f"{t}\t{d}\t{c}".encode() for t, d, c in _toy_entries()]
  lines += [b"no definition\t\tanimals", b"caf\xe9\tnot UTF-8\ttools", b""]
  source.write_bytes(b"\n".join(lines))
  module_path = tmp_path / "toy_glossary.py"
  module_path.write_text(TOY_MODULE.format(source=str(source)))
  monkeypatch.setattr(corpora.registry, "_CORPORA", dict(corpora.registry._CORPORA))  # pylint: disable=protected-access
  spec = importlib.util.spec_from_file_location("big_embed_test_toy_glossary", module_path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)
  return module


def test_a_new_corpus_is_one_module(toy_corpus, tmp_path, capsys):
  assert "toy_glossary" in corpora.names("text") and "toy_glossary" not in corpora.names("image")
  data_dir = tmp_path / "data"
  build.prepare(["toy_glossary"], data_dir)  # the real prepare path
  assert "toy_glossary: skipped 2 empty and 1 non-UTF-8 records" in capsys.readouterr().out
  assert not (data_dir / "tokenizer.json").exists()
  entries = _toy_entries()
  want = {s: {e[0]: e for e in entries if _naive_is_test(e[0], 30) == (s == "test")} for s in ("train", "test")}
  topics = ("animals", "plants", "tools")
  got = {s: {r["term"].decode(): (r["term"].decode(), r["definition"].decode(), topics[r["topic"]])
             for r in _all_records("toy_glossary", data_dir, s)} for s in ("train", "test")}
  assert got == want and want["train"] and want["test"]

  # A text task stream reads it: every retrieval row is a (definition, term) pair of the train split, every
  # classification row a definition with its topic.
  tok = tokenizer_lib.train_tokenizer([t for e in entries for t in e] + ["q", "d"], vocab_size=300)
  cfg = ml_collections.ConfigDict(dict(data_dir=str(data_dir), num_threads=1, prefetch_buffer_size=1, tasks={
      "gloss": config_utils.text_task(type="retrieval", dataset="toy_glossary", batch_size=4,
                                      fields={"query": "definition", "doc": "term"}),
      "topics": config_utils.text_task(type="classification", dataset="toy_glossary", batch_size=4,
                                       fields={"text": "definition", "label": "topic"})}))
  specs = text_tasks.validate_tasks(cfg, 4, 2, 1)
  it = iter(text_stream.make_text_train_dataset(specs, cfg, tok, max_text_len=12, query_prefix="q ",
                                                doc_prefix="d ", seed=0))
  enc = lambda texts: tok.encode_batch(list(texts), 12)  # pylint: disable=unnecessary-lambda-assignment
  pairs = {enc(["q " + d])[0].tobytes(): e for e in want["train"].values() for d in [e[1]]}
  seen = set()
  for _ in range(12):
    task_type, batch = next(it)
    seen.add(task_type)
    rows = [pairs[q.tobytes()] for q in batch["query"]]
    if task_type == "retrieval":
      np.testing.assert_array_equal(batch["key"], enc(["d " + e[0] for e in rows]))
    else:
      assert task_type == "classification"
      np.testing.assert_array_equal(batch["ids"], [topics.index(e[2]) for e in rows])
      np.testing.assert_array_equal(batch["key"], enc(["d " + e[2] for e in rows]))
  assert seen == {"retrieval", "classification"}

  # A text evaluator reads it with the registry's defaults (definition -> term): a perfect encoder (one-hot of the
  # entry a text belongs to) ranks every query's own term first; pairing a query with another term would not.
  index = {t: i for i, e in enumerate(entries) for t in e[:2]}
  encode = lambda params, texts, role, desc=None: np.eye(len(entries), dtype=np.float32)[[index[t] for t in texts]]
  ctx = types.SimpleNamespace(encode_texts=encode, data_dir=str(data_dir))
  evaluator = eval_registry.build_evaluators(
      ml_collections.ConfigDict({"e": {"type": "text_retrieval", "dataset": "toy_glossary"}}), ctx)["e"]
  assert sorted(evaluator.queries) == sorted(e[1] for e in want["test"].values())
  assert sorted(evaluator.corpus) == sorted(want["test"])
  assert evaluator.run("params") == {"recall@1": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0}


def test_prepare_installs_the_registered_debian_packages(toy_corpus, tmp_path, monkeypatch):
  class PackagedGlossaryBuilder(toy_corpus.ToyGlossaryBuilder, skip_registration=True):
    name = "big_embed_test_packaged_glossary"

  corpora.register(corpora.Corpus(name="packaged_glossary", builder=PackagedGlossaryBuilder, kind="text",
                                  fields={"term": "text", "definition": "text", "topic": "class"},
                                  debian_packages=("big-embed-no-such-package",)))
  monkeypatch.setattr(debian, "_installed_files", lambda p: None)  # As if nothing were installed.
  monkeypatch.setattr(os, "geteuid", lambda: 1000)  # Not root: never runs apt-get.
  with pytest.raises(DataError, match="sudo apt-get install -y big-embed-no-such-package"):
    build.prepare(["packaged_glossary"], tmp_path)
  assert not sources.is_prepared("packaged_glossary", tmp_path)
  build.prepare(["toy_glossary"], tmp_path)  # the same builder without packages needs none
  assert sources.is_prepared("toy_glossary", tmp_path)
