"""Your own data: `python -m big_embed.data.prepare files` on files written here, then found by name everywhere.

The worked examples of docs/datasets.md ("Your own data") run as written: a JSONL of a few thousand real text pairs
(Python standard-library names and the first lines of their docstrings) with bad records -> `prepare files` -> the
documented text recipe trains a few steps (with the records' own hard negatives) -> retrieval on its test split;
the same for a folder of image files drawn here with a CSV. Expected records, splits and pixels are computed here
independently (json, hashlib, NumPy slicing), never by the code under test.
"""

import csv
import hashlib
import importlib
import inspect
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types
import warnings

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from big_embed import config_utils
from big_embed import run as run_lib
from big_embed.data import own_dataset, own_files, sources, text_stream, text_tasks
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.errors import DataError
from big_embed.errors import ConfigError
from big_embed.evaluate import registry as eval_registry
from big_embed.train import loop
from tests import tiny

DOCS = tiny.ROOT / "docs" / "datasets.md"
# Standard-library modules whose public functions, classes and methods give the text pairs.
MODULES = ("os", "os.path", "re", "json", "string", "textwrap", "collections", "itertools", "functools", "inspect",
           "pathlib", "typing", "argparse", "logging", "email.message", "http.client", "urllib.parse", "shutil",
           "tarfile", "zipfile", "datetime", "decimal", "fractions", "statistics", "random", "csv", "subprocess",
           "threading", "unittest", "difflib", "pickle", "socket", "tempfile", "glob", "fnmatch", "calendar", "heapq",
           "bisect", "codecs", "locale", "gettext", "io", "enum", "dataclasses", "contextlib", "copy", "pprint",
           "hashlib", "hmac", "base64", "html.parser", "mimetypes", "uuid", "ipaddress", "platform", "traceback",
           "warnings", "weakref", "types", "ast", "dis", "tokenize", "smtplib", "ftplib", "configparser", "shlex",
           "cmd", "queue", "sched", "selectors", "gzip", "bz2", "lzma", "doctest", "timeit", "trace", "pdb",
           "pstats", "wave", "plistlib", "xml.dom.minidom", "xml.etree.ElementTree", "sqlite3", "imaplib", "poplib",
           "mailbox", "netrc", "pkgutil", "modulefinder", "filecmp", "numbers", "graphlib", "zoneinfo", "optparse",
           "email.utils", "http.cookies", "http.server", "urllib.request", "xmlrpc.client", "concurrent.futures",
           "multiprocessing.pool", "code", "codeop", "reprlib", "pyclbr", "pickletools", "zipapp", "sysconfig",
           "json.decoder", "json.encoder", "logging.handlers", "unittest.mock", "unittest.case", "asyncio.base_events",
           "asyncio.streams", "asyncio.locks", "asyncio.queues", "asyncio.tasks", "asyncio.events",
           "importlib.metadata", "http.cookiejar", "email.parser", "email.feedparser", "email.policy",
           "email.headerregistry", "email.charset", "xml.sax.saxutils", "xml.dom.pulldom",
           "multiprocessing.connection", "concurrent.futures.thread", "urllib.robotparser", "wsgiref.handlers")
NUM_PAIRS = 2500
# Line number -> the bad record written there instead of a good one, and the reason it is skipped.
BAD_LINES = {
    3: (b'{"id": "bad.3", "query": "a query without its positive"}', "missing field"),
    10: (b'{"id": "bad.10", "query": "   ", "positive": "bad.10"}', "empty text"),
    20: (b'{"id": "bad.20", "query": "a number as the positive", "positive": 42}', "wrong type"),
    30: (b'{"id": "bad.30", "query": "caf\xe9 in Latin-1", "positive": "bad.30"}', "non-UTF-8"),
    40: (b'{"id": "bad.40", "query": "cut short', "not a JSON object"),
    50: (b'{"id": "bad.50", "query": "numbers as negatives", "positive": "bad.50", "negative": [1, 2]}', "wrong type"),
}
TEXT_SKIPS = ("skipped 6 records (not a JSON object: 1, line 40; non-UTF-8: 1, line 30; missing field: 1, line 3; "
              "empty text: 1, line 10; wrong type: 2, lines 20, 50)")


def _is_test(key: str, percent: int) -> bool:
  """The documented split rule, written out: sha1(key), first 8 bytes big-endian, mod 100 < percent."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") % 100 < percent


def _docs_recipe(kind: str, directory: pathlib.Path) -> pathlib.Path:
  """The ```python block after the `<!-- own-data: {kind} recipe` marker of docs/datasets.md, as a recipe file."""
  text = DOCS.read_text(encoding="utf-8")
  match = re.search(rf"<!-- own-data: {kind} recipe[^\n]*-->\n```python\n(.*?)\n```", text, re.DOTALL)
  assert match, f"docs/datasets.md has no {kind} recipe block"
  path = directory / f"{kind.replace('-', '_').replace(' ', '_')}_recipe.py"
  path.write_text(match.group(1) + "\n", encoding="utf-8")
  return path


def _stdlib_pairs() -> list[dict]:
  """NUM_PAIRS real text pairs: {"id": qualified name, "query": its first docstring line, "positive": the name,
  "negative": the next name (a sibling in the same module)}, sorted by name."""
  docs = {}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for name in MODULES:
      try:
        module = importlib.import_module(name)
      except ImportError:  # a Python build without it
        continue
      for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
          continue
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
          continue
        items = [(f"{name}.{attr}", obj)]
        if inspect.isclass(obj):
          items += [(f"{name}.{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                    if not m.startswith("_") and inspect.isfunction(f)]
        for qualname, o in items:
          doc = (inspect.getdoc(o) or "").strip()
          if doc and doc.splitlines()[0].strip():
            docs.setdefault(qualname, doc.splitlines()[0].strip())
  names = sorted(docs)[:NUM_PAIRS]
  assert len(names) == NUM_PAIRS, len(names)
  return [{"id": n, "query": docs[n], "positive": n, "negative": names[(i + 1) % len(names)]}
          for i, n in enumerate(names)]


def _prepare_cli(*args):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "big_embed.data.prepare", "files", *args], cwd=tiny.ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def text_pairs(tmp_path_factory):
  """pairs.jsonl (NUM_PAIRS lines, BAD_LINES among them) prepared as `mydocs` with the CLI; returns (data dir, the
  good records, the CLI's stdout)."""
  root = tmp_path_factory.mktemp("own_text")
  pairs = _stdlib_pairs()
  lines = [json.dumps(p).encode() for p in pairs]
  for number, (raw, _) in BAD_LINES.items():
    lines[number - 1] = raw
  (root / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
  good = [p for i, p in enumerate(pairs, start=1) if i not in BAD_LINES]
  proc = _prepare_cli("--name=mydocs", f"--train={root / 'pairs.jsonl'}", f"--data_dir={root / 'data'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root / "data", good, proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# The reader.


def test_jsonl_records_and_every_kind_of_bad_record(tmp_path):
  lines = [
      b'{"query": "first", "positive": "  padded  ", "score": 1, "label": 3, "extra": "x"}',
      b'{"query": "no score", "positive": "p", "label": "a"}',
      b'{"query": "a string score", "positive": "p", "score": "high", "label": "a"}',
      b'{"query": "not finite", "positive": "p", "score": NaN, "label": "a"}',
      b'{"query": "a bool label", "positive": "p", "score": 0.5, "label": true}',
      b'{"query": ["a", "list"], "positive": "p", "score": 0.5, "label": "a"}',
      b'{"query": "escaped \\udc80 surrogate", "positive": "p", "score": 0.5, "label": "a"}',
      b'{"query": "raw \xff byte", "positive": "p", "score": 0.5, "label": "a"}',
      b"not json at all",
      b"[1, 2]",
      b"",
      b'{"query": "last", "positive": "p2", "score": 0.25, "label": "b", "negative": "n1", "negatives": ["n2", ""]}',
      b'{"query": "null positive", "positive": null, "score": 0.5, "label": "a"}',
  ]
  path = tmp_path / "scored.jsonl"
  path.write_bytes(b"\n".join(lines))
  read = own_files.read_file(path)
  assert read.kind == "text" and read.roles == ("query", "positive", "negatives", "score", "label")
  assert read.records == [
      {"query": "first", "positive": "padded", "score": 1.0, "label": "3", "negatives": [], "line": 1},
      {"query": "last", "positive": "p2", "score": 0.25, "label": "b", "negatives": ["n1", "n2"], "line": 12},
  ]
  assert read.skips.counts == {"missing field": 2, "wrong type": 4, "non-UTF-8": 2, "not a JSON object": 2}
  assert read.skips.lines == {"missing field": [2, 13], "wrong type": [3, 4, 5, 6], "non-UTF-8": [7, 8],
                              "not a JSON object": [9, 10]}
  assert read.ignored == {"extra": 1}
  assert read.skips.message() == ("skipped 10 records (not a JSON object: 2, lines 9, 10; non-UTF-8: 2, lines 7, 8; "
                                  "missing field: 2, lines 2, 13; wrong type: 4, lines 3, 4, 5, 6)")


TABLE_RECORDS = [
    {"query": "what is a heron", "positive": "a wading bird, long legs", "negatives": ["an otter", "a fern"],
     "id": "h1"},
    {"query": "what is an auger", "positive": "a tool\nthat bores holes", "negatives": [], "id": "a1"},
    {"query": "what is maple", "positive": "a tree", "negatives": ["a fern"], "id": "m1"},
]


def test_tsv_and_csv_read_like_jsonl(tmp_path):
  """The same records as TSV (a repeated `negative` column is a list) and CSV (quoted commas and newlines)."""
  tsv = tmp_path / "pairs.tsv"
  tsv.write_text("id\tquery\tpositive\tnegative\tnegative\n"
                 "h1\twhat is a heron\ta wading bird, long legs\tan otter\ta fern\n"
                 "x1\t\tempty query\t\t\n"
                 "a1\twhat is an auger\ta tool\\nthat bores holes\n"  # short row: the negatives are empty
                 "m1\twhat is maple\ta tree\t\ta fern\n"
                 "x2\tq\tp\tn\tn\textra cell\n", encoding="utf-8")
  read = own_files.read_file(tsv)
  want = [dict(r) for r in TABLE_RECORDS]
  want[1]["positive"] = "a tool\\nthat bores holes"  # a TSV has no escapes
  assert [{k: v for k, v in r.items() if k != "line"} for r in read.records] == want
  assert [r["line"] for r in read.records] == [2, 4, 5]
  assert read.skips.lines == {"empty text": [3], "too many cells": [6]}

  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(["id", "query", "positive", "negative", "negative"])
  writer.writerow(["h1", "what is a heron", "a wading bird, long legs", "an otter", "a fern"])
  writer.writerow(["a1", "what is an auger", "a tool\nthat bores holes", "", ""])  # spans lines 3-4
  writer.writerow(["m1", "what is maple", "a tree", "", "a fern"])
  (tmp_path / "pairs.csv").write_bytes(buf.getvalue().encode() + b"z1,caf\xe9,p,,\n")
  read = own_files.read_file(tmp_path / "pairs.csv")
  assert [{k: v for k, v in r.items() if k != "line"} for r in read.records] == TABLE_RECORDS
  assert [r["line"] for r in read.records] == [2, 3, 5]
  assert read.skips.lines == {"non-UTF-8": [6]}


def test_fields_map_other_names_to_roles(tmp_path):
  path = tmp_path / "labelled.csv"
  path.write_text("text,topic,note\nherons wade,birds,x\nmaples shed leaves,trees,y\n", encoding="utf-8")
  with pytest.raises(DataError, match="a text file needs `query`.*--fields=text=query"):
    own_files.read_file(path)
  read = own_files.read_file(path, fields={"text": "query", "topic": "label"})
  assert read.roles == ("query", "label") and read.ignored == {"note": 2}
  assert [(r["query"], r["label"]) for r in read.records] == [("herons wade", "birds"), ("maples shed leaves", "trees")]
  assert own_files.parse_fields(" text=query, topic=label ") == {"text": "query", "topic": "label"}
  with pytest.raises(DataError, match="is not column=role"):
    own_files.parse_fields("text")
  with pytest.raises(DataError, match=r"unknown role\(s\) \['answer'\]"):
    own_files.read_file(path, fields={"text": "answer"})


def test_hash_split_is_stable_and_keeps_equal_ids_together():
  records = [{"id": f"doc{i // 3}", "query": f"q{i}"} for i in range(600)] + [{"query": f"free {i}"} for i in range(90)]
  split = own_files.split_by_id(records, 10)
  want_test = [r for r in records if _is_test(r.get("id") or r["query"], 10)]
  assert split["test"] == want_test and split["train"] == [r for r in records if r not in want_test]
  assert 0.05 < len(want_test) / len(records) < 0.15
  test_ids = {r["id"] for r in split["test"] if "id" in r}
  assert not test_ids & {r["id"] for r in split["train"] if "id" in r}  # equal ids on one side
  again = own_files.split_by_id(records[::-1][:400], 10)  # other records do not move a record
  assert all(r in split["test"] for r in again["test"]) and all(r in split["train"] for r in again["train"])


def test_bad_files_and_flags_are_one_line_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"query": "q", "positive": ""}\n{"query": 1, "positive": "p"}\n')
  with pytest.raises(DataError, match=re.escape(f"{bad}: no usable record (skipped 2 records (empty text: 1, line "
                                                "1; wrong type: 1, line 2)); each record needs query, positive")):
    own_files.read_file(bad)
  with pytest.raises(DataError, match=r"unknown format '\.txt'; use one of \.jsonl, \.tsv, \.csv"):
    own_files.read_file(tmp_path / "pairs.txt")
  with pytest.raises(DataError, match="no such file"):
    own_files.read_file(tmp_path / "missing.jsonl")
  pics = tmp_path / "pics.csv"
  pics.write_text("image,label\na.png,cat\n", encoding="utf-8")
  with pytest.raises(DataError, match="needs a `caption` with every `image`"):
    own_files.read_file(pics)
  (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
  with pytest.raises(DataError, match="no header row"):
    own_files.read_file(tmp_path / "empty.tsv")
  few = tmp_path / "few.jsonl"
  few.write_text("".join(json.dumps({"id": "same", "query": f"q{i}", "positive": "p"}) + "\n" for i in range(5)))
  side = "test" if _is_test("same", 10) else "train"
  other = {"train": "test", "test": "train"}[side]
  with pytest.raises(DataError, match=f"the hash split leaves {other} empty .*--test FILE"):
    own_dataset.prepare_files("few", few, data_dir=tmp_path / "data")
  for name, match in (("My-Docs", "must be a lower-case identifier"), ("emoji", "taken by a bundled dataset"),
                      ("mined", "taken by a bundled dataset")):
    with pytest.raises(ConfigError, match=match):
      own_dataset.prepare_files(name, few, data_dir=tmp_path / "data")
  with pytest.raises(ConfigError, match="--test_percent=0 must be in 1..99"):
    own_dataset.prepare_files("few", few, data_dir=tmp_path / "data", test_percent=0)
  assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def _own_negatives(i: int):
  """Record i's negatives: none, one text, or lists with repeats and other records' positives."""
  return [None, f"answer {(i + 1) % 40}", [f"answer {(i + 1) % 40}", f"wrong {i}"],
          [f"wrong {i}", f"wrong {i}", f"answer {(i + 2) % 40}", f"other {i}"]][i % 4]


def test_own_negatives_reach_retrieval_batches(tmp_path):
  """Every row's hard negatives are its record's own distinct negatives, less those that are a positive of the
  batch, padded to num_negatives."""
  records = [{"id": i, "query": f"question {i}", "positive": f"answer {i}", "negative": _own_negatives(i)}
             for i in range(40)]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                                for r in records))
  (tmp_path / "test.jsonl").write_text(json.dumps({"query": "held out", "positive": "answer"}) + "\n")
  data_dir = own_dataset.prepare_files("negs", tmp_path / "train.jsonl", tmp_path / "test.jsonl", tmp_path / "d")
  tok = tokenizer_lib.Tokenizer.from_file(data_dir / "negs" / "tokenizer.json")
  cfg = ml_collections.ConfigDict(dict(data_dir=str(data_dir), num_threads=1, prefetch_buffer_size=1, tasks={
      "negs": config_utils.text_task(dataset="negs", batch_size=8, num_negatives=5)}))  # > the 4 of any record
  specs = text_tasks.validate_tasks(cfg, 8, 2, 1)
  stream = iter(text_stream.make_text_train_dataset(specs, cfg, tok, max_text_len=6, query_prefix="", doc_prefix="",
                                                    seed=0))
  enc = lambda t: tok.encode_batch([t], 6)[0].tobytes()  # pylint: disable=unnecessary-lambda-assignment
  by_query = {enc(r["query"]): r for r in records}
  dropped = 0
  for _ in range(10):
    _, batch = next(stream)
    positives = {k.tobytes() for k in batch["key"]}
    for query, negatives, valid in zip(batch["query"], batch["hard_negatives"], batch["hard_negative_valid"]):
      own = _own_negatives(by_query[query.tobytes()]["id"])
      own = list(dict.fromkeys([own] if isinstance(own, str) else own or []))
      usable = {enc(t) for t in own} - positives
      dropped += len(own) - len(usable)
      got = [n.tobytes() for n, v in zip(negatives, valid) if v]
      assert len(got) == len(set(got)) == min(5, len(usable)) and set(got) <= usable
      assert not negatives[~valid].any()  # padding slots are all-pad rows
  assert dropped > 0  # some negatives were another row's positive


# ---------------------------------------------------------------------------------------------------------------
# A TFDS dataset of the user's own, put into the data dir.


class _UserBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset the user built with TFDS: fields named like the roles."""

  name = "user_pairs"
  VERSION = tfds.core.Version("2.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "query": tfds.features.Text(), "positive": tfds.features.Text(), "score": tfds.features.Scalar(np.float32),
        "label": tfds.features.ClassLabel(names=["bird", "tool", "tree"]), "source": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 52)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {"query": f"question {i}", "positive": f"answer {i}", "score": i / 52, "label": i % 3,
                "source": "made by hand"}


def test_a_tfds_dataset_of_your_own_is_found_by_name(tmp_path):
  data_dir = tmp_path / "data"
  _UserBuilder(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
  assert "user_pairs" in sources.names("text", data_dir) and "user_pairs" not in sources.names("image", data_dir)
  corpus = sources.corpus("user_pairs", data_dir)
  assert (corpus.retrieval, corpus.sts, corpus.probe, corpus.negatives) == (
      ("query", "positive"), ("query", "positive", "score"), ("query", "label"), None)
  assert len(sources.open_split("user_pairs", data_dir, "test")) == 12

  # Text tasks find their fields from the roles; any field can still be named.
  cfg = ml_collections.ConfigDict(dict(data_dir=str(data_dir), tasks={
      "pairs": config_utils.text_task(type="retrieval", dataset="user_pairs", batch_size=4),
      "scored": config_utils.text_task(type="sts", dataset="user_pairs", batch_size=4),
      "kinds": config_utils.text_task(type="classification", dataset="user_pairs", batch_size=4),
      "by_source": config_utils.text_task(type="retrieval", dataset="user_pairs", batch_size=4,
                                          fields={"doc": "source"})}))
  specs = text_tasks.validate_tasks(cfg, 4, 2, 1)
  assert specs["pairs"].fields == {"query": "query", "doc": "positive"}
  assert specs["scored"].fields == {"text_a": "query", "text_b": "positive", "score": "score"}
  assert specs["kinds"].fields == {"text": "query", "label": "label"}
  assert specs["by_source"].fields == {"query": "query", "doc": "source"}
  cfg.tasks.pairs.num_negatives = 1
  with pytest.raises(ConfigError, match="needs a mined hard-negative set.*a dataset whose records hold their own"):
    text_tasks.validate_tasks(cfg, 4, 2, 1)

  # The text evaluators read it with those defaults: a perfect encoder finds every test query's answer.
  index = {t: i % 52 for i in range(52) for t in (f"question {i}", f"answer {i}")}
  encode = lambda params, texts, role, desc=None: np.eye(52, dtype=np.float32)[[index[t] for t in texts]]
  ctx = types.SimpleNamespace(encode_texts=encode, data_dir=str(data_dir))
  evaluator = eval_registry.build_evaluators(
      ml_collections.ConfigDict({"e": {"type": "text_retrieval", "dataset": "user_pairs"}}), ctx)["e"]
  assert sorted(evaluator.queries) == sorted(f"question {i}" for i in range(40, 52))
  assert evaluator.run(None) == {"recall@1": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "ndcg@10": 1.0}

  # A copy stored in another format, or in a folder that is no dataset name, is explained, not hidden.
  for folder, change in (("user_tfrecord", True), ("bad-name", False)):
    copy = data_dir / folder / "2.1.0"
    copy.mkdir(parents=True)
    for f in (data_dir / "user_pairs" / "2.1.0").iterdir():
      (copy / f.name).write_bytes(f.read_bytes())
    if change:
      info = json.loads((copy / "dataset_info.json").read_text())
      info["fileFormat"] = "tfrecord"
      (copy / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(DataError, match=r"stored as tfrecord.*tfds convert_format --dataset_version_dir=.*user_tfrecord"):
    sources.open_split("user_tfrecord", data_dir, "train")
  with pytest.raises(DataError, match="is not named like a dataset"):
    sources.corpus("bad-name", data_dir)
  with pytest.raises(ConfigError, match="unknown dataset 'nothing_here'.*prepare files --name nothing_here"):
    sources.corpus("nothing_here", data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Worked example 1: text pairs.


@pytest.mark.slow
def test_text_pairs_prepare_counts_bad_records_and_splits_by_id(text_pairs):
  data_dir, good, stdout = text_pairs
  want = {s: sorted((p["query"], p["positive"], (p["negative"],)) for p in good
                    if _is_test(p["id"], 10) == (s == "test")) for s in ("train", "test")}
  last = stdout.strip().splitlines()[-1]
  assert last.startswith(f"mydocs: built {{'train': {len(want['train'])}, 'test': {len(want['test'])}}} in "), last
  assert last.endswith(f"{data_dir / 'mydocs' / '1.0.0'}; {TEXT_SKIPS}"), last
  assert len(want["train"]) + len(want["test"]) == NUM_PAIRS - len(BAD_LINES)
  for split, records in want.items():
    got = sorted((r["query"].decode(), r["positive"].decode(), tuple(n.decode() for n in r["negatives"]))
                 for r in sources.read_all("mydocs", data_dir, split))
    assert got == records, split
  assert (data_dir / "mydocs" / "tokenizer.json").is_file() and "config.model.tokenizer = 'mydocs'" in stdout
  again = _prepare_cli("--name=mydocs", "--train=pairs.jsonl", f"--data_dir={data_dir}")  # built: kept
  assert again.returncode == 0 and "already built" in again.stdout and "--overwrite" in again.stdout


@pytest.mark.slow
def test_text_pairs_train_with_their_own_negatives_and_evaluate_retrieval(text_pairs, tmp_path):
  data_dir, good, _ = text_pairs
  cfg = config_utils.load_recipe(_docs_recipe("text", tmp_path), "tiny")
  cfg.data.data_dir = str(data_dir)
  tok = tokenizer_lib.Tokenizer.from_file(data_dir / "mydocs" / "tokenizer.json")
  max_len = cfg.model.max_text_len

  # The training stream: every row is a training pair with one of its record's own negatives.
  specs = text_tasks.validate_tasks(cfg.data, cfg.train.batch_size, 8, 1)
  assert specs["mydocs"].fields == {"query": "query", "doc": "positive", "negatives": "negatives"}
  stream = iter(text_stream.make_text_train_dataset(specs, cfg.data, tok, max_text_len=max_len, query_prefix="",
                                                    doc_prefix="", seed=0))
  by_key = {tok.encode_batch([p["positive"]], max_len)[0].tobytes(): p for p in good if not _is_test(p["id"], 10)}
  for _ in range(3):
    task, batch = next(stream)
    assert task == "retrieval" and batch["hard_negatives"].shape == (16, 1, max_len)
    positives = {k.tobytes() for k in batch["key"]}
    for key, negative, valid in zip(batch["key"], batch["hard_negatives"][:, 0], batch["hard_negative_valid"][:, 0]):
      record = by_key[key.tobytes()]
      want = tok.encode_batch([record["negative"]], max_len)[0]
      assert valid == (want.tobytes() not in positives)  # a negative that is another row's positive is dropped
      np.testing.assert_array_equal(negative, want if valid else np.zeros_like(want))

  # The documented recipe trains on it (from scratch, with the dataset's tokenizer) and evaluates retrieval.
  workdir = tmp_path / "run"
  results = loop.train_and_evaluate(cfg, str(workdir))
  assert tokenizer_lib.Tokenizer.from_file(workdir / "tokenizer.json") == tok
  losses = [json.loads(l).get("train/loss") for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [v for v in losses if v is not None] and all(math.isfinite(v) for v in losses if v is not None)
  assert set(results["mydocs"]) == {"recall@1", "recall@10", "mrr@10", "ndcg@10"}
  assert all(0 <= v <= 1 for v in results["mydocs"].values()), results

  # The evaluator read the test split: its queries are the held-out records' queries.
  ctx = types.SimpleNamespace(encode_texts=None, data_dir=str(data_dir))
  evaluator = eval_registry.build_evaluators(
      ml_collections.ConfigDict({"e": dict(cfg.evals.mydocs)}), ctx)["e"]
  assert sorted(evaluator.queries) == sorted(p["query"] for p in good if _is_test(p["id"], 10))

  with pytest.raises(ConfigError, match="no dataset of .* with a tokenizer .*prepare files --name nothing_here"):
    run_lib.run_tokenizer(tmp_path, ml_collections.ConfigDict(dict(type="text", tokenizer="nothing_here")), data_dir)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
  (tmp_path / "bad.jsonl").write_bytes(b'{"query": "q", "positive": 3}\nnot json\n')
  proc = _prepare_cli("--name=bad", f"--train={tmp_path / 'bad.jsonl'}", f"--data_dir={tmp_path / 'data'}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'bad.jsonl'}: no usable record (skipped 2 records (not a JSON object: 1, line 2; wrong "
      "type: 1, line 1)); each record needs query, positive")
  proc = _prepare_cli("--train=pairs.jsonl")
  assert proc.returncode == 1 and "files needs --name NAME and --train FILE" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# Worked example 2: an image folder.

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, color: tuple[int, int, int], variant: int, size: int = 48) -> Image.Image:
  image = Image.new("RGB", (size, size), (255, 255, 255))
  d = ImageDraw.Draw(image)
  r = 10 + variant % 4 * 3
  cx, cy = 14 + variant * 3 % 20, 14 + variant * 7 % 20
  box = (cx - r // 2, cy - r // 2, cx + r, cy + r)
  if shape == "circle":
    d.ellipse(box, fill=color)
  elif shape == "square":
    d.rectangle(box, fill=color)
  else:
    d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=color)
  return image


@pytest.mark.slow
def test_image_folder_prepare_train_and_evaluate(tmp_path, capsys):
  folder = tmp_path / "pics"
  (folder / "img").mkdir(parents=True)
  rows, expected = [["image", "caption", "label"]], {}
  for i in range(96):
    shape, color = SHAPES[i % 3], list(COLORS)[i // 3 % 4]
    name = f"img/{i:04d}." + ("jpg" if i % 10 == 0 else "png")
    _draw(shape, COLORS[color], i // 12).save(folder / name)
    rows.append([name, f"a {color} {shape}" + (", drawn small" if i % 12 < 4 else ""), shape])
  wide = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)  # 64 wide, 32 high
  Image.fromarray(wide).save(folder / "img" / "wide.png")
  rgba = np.random.default_rng(1).integers(0, 256, (32, 32, 4), dtype=np.uint8)
  rgba[..., 3] = np.where(rgba[..., 3] > 127, 255, 0)
  Image.fromarray(rgba, "RGBA").save(folder / "img" / "alpha.png")
  gray = np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)
  Image.fromarray(gray, "L").save(folder / "img" / "gray.png")
  expected = {"img/wide.png": wide[:, 16:48],  # shorter side already 32: the centre crop
              "img/alpha.png": np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8),  # on white
              "img/gray.png": np.repeat(gray[..., None], 3, axis=-1)}
  rows += [["img/wide.png", "a wide noise picture", "square"], ["img/alpha.png", "a see-through square", "square"],
           ["img/gray.png", "a grey noisy square", "square"]]
  (folder / "img" / "broken.png").write_bytes(b"this is not a png")
  bad = [["img/0001.png", "", "circle"], ["img/broken.png", "a broken image", "circle"],
         ["img/missing.png", "a missing image", "circle"], ["img/0002.png", "too", "many", "cells"],
         ["img/0003.png", "no label", ""]]
  first_bad = len(rows) + 1  # line numbers: the header is line 1
  rows += bad
  with open(folder / "pics.csv", "w", newline="", encoding="utf-8") as f:
    csv.writer(f).writerows(rows)
  own_dataset.prepare_files("mypics", folder / "pics.csv", data_dir=tmp_path / "data", test_percent=20,
                            image_size=32)
  out = capsys.readouterr().out
  good = rows[1:first_bad - 1]
  want = {s: sorted(r[1] for r in good if _is_test(r[0], 20) == (s == "test")) for s in ("train", "test")}
  b = first_bad
  assert (f"mypics: built {{'train': {len(want['train'])}, 'test': {len(want['test'])}}}" in out
          and f"skipped 5 records (missing field: 1, line {b + 4}; empty text: 1, line {b}; too many cells: 1, line "
          f"{b + 3}; unreadable image: 2, lines {b + 1}, {b + 2})" in out), out
  data_dir = tmp_path / "data"
  assert sources.names("image", data_dir)[-1] == "mypics"
  stored = {}
  for split in ("train", "test"):
    records = sources.read_all("mypics", data_dir, split)
    assert sorted(r["caption"].decode() for r in records) == want[split]
    stored.update({r["id"].decode(): r["image"] for r in records})
  assert all(v.shape == (32, 32, 3) and v.dtype == np.uint8 for v in stored.values())
  for name, pixels in expected.items():
    np.testing.assert_array_equal(stored[name], pixels, err_msg=name)
  square = np.asarray(Image.open(folder / "img" / "0004.png").convert("RGB").resize((32, 32),
                                                                                    Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(stored["img/0004.png"], square)
  tok = tokenizer_lib.load_tokenizer(data_dir)  # the shared image-text tokenizer learnt the captions and prompts
  assert tok.unk_id not in tok.encode_batch(["a yellow triangle, drawn small", "a photo of a circle."], 12)

  cfg = config_utils.load_recipe(_docs_recipe("image-text", tmp_path), "tiny")
  cfg.data.data_dir = str(data_dir)
  results = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert {"i2t_r1", "t2i_r1", "chance_r10"} <= set(results["mypics"])
  assert results["mypics"]["chance_r10"] == pytest.approx(100 * min(10, len(want["test"])) / len(want["test"]))
  assert set(results["mypics_labels"]) == {"top1", "top5"} and 0 <= results["mypics_labels"]["top1"] <= 100
