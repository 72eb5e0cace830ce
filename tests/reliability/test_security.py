"""Security basics: names that become paths are checked, nothing is deleted outside its own store, no network.

Every entry point that turns a user's name into a directory (mine's `--name` and its writer, `prepare files
--name`, config dataset / mined / mixture names, a tokenizer given as a dataset name) answers each hostile name of
`HOSTILE` with one `ConfigError` line naming the flag or field, and nothing is created, changed or deleted in the
data dir or next to it (a sentinel directory there keeps its bytes). The stores that replace a directory (mined
sets, exports, dataset builds) replace only what they wrote themselves.
"""

import hashlib
import json
import os
import pathlib
import socket

import ml_collections
import numpy as np
import pytest

from big_embed import config_utils, encode, export, mine, models
from big_embed import run as run_lib
from big_embed.data import build, mined_negatives, own_dataset, paths, pipeline, sources, text_batches, text_tasks
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError, UserError
from tests.test_export import random_params, text_config, word_tokenizer

DATASET = "sec_docs"
SENTINEL = "sentinel"  # a directory next to the data dir that hostile names aim at
HOSTILE = {"parent": "../x", "absolute": "/abs", "nested": "a/b", "dotdot": "..", "dot": ".", "empty": "",
           "backslash": "a\\b", "nul": "x\x00", "dash": "-rf", "hidden": ".hidden", "long": "n" * 300,
           "space": "a b", "to_sentinel": f"../../{SENTINEL}"}


def _snapshot(root: pathlib.Path) -> dict[str, str]:
  """Every path under `root` -> the sha256 of a file's bytes, "dir" or "link -> target"."""
  out = {}
  for path in sorted(root.rglob("*")):
    key = str(path.relative_to(root))
    if path.is_symlink():
      out[key] = f"link -> {os.readlink(path)}"
    elif path.is_dir():
      out[key] = "dir"
    else:
      out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def _one_line(err: BaseException, *needles: str) -> str:
  """The error's message, checked to be one line that names each of `needles`."""
  message = str(err)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  return message


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """<root>/data: a data dir with one text dataset of our own (`DATASET`, with its tokenizer); <root>/sentinel:
  a directory with a file that must survive; <root>/data/mined/good: a mined set."""
  base = tmp_path_factory.mktemp("security")
  records = [{"query": f"question {i} about topic {i % 5}", "positive": f"answer {i} on topic {i % 5}"}
             for i in range(40)]
  (base / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  own_dataset.prepare_files(DATASET, base / "pairs.jsonl", data_dir=base / "data", test_percent=25)
  (base / SENTINEL).mkdir()
  (base / SENTINEL / "keep.txt").write_text("must survive", encoding="utf-8")
  n = len(sources.open_split(DATASET, base / "data", "train"))
  mined_negatives.write_mined_negatives(
      mined_negatives.mined_dir(base / "data", "good"), source_dataset=DATASET, split="train", query_field="query",
      doc_field="positive", negatives=np.full((n, 2), -1), scores=np.zeros((n, 2)), meta={})
  return base


@pytest.fixture
def untouched(root):
  """Asserts after the test that nothing under the root (data dir, sentinel, inputs) was created or changed."""
  before = _snapshot(root)
  yield root
  assert _snapshot(root) == before


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_check_name_refuses_every_hostile_name(name):
  with pytest.raises(ConfigError) as e:
    paths.check_name(name, "--name")
  _one_line(e.value, "--name=", "a name that becomes a directory must be plain")


@pytest.mark.parametrize("name", ["my_docs", "bible_minilm", "wordnet_defs_text_retrieval", "set-2.v1", "_x",
                                  "A9", "n" * paths.MAX_NAME_LENGTH])
def test_check_name_keeps_plain_names(name):
  assert paths.check_name(name, "--name") == name


def _mine_config(data_dir: pathlib.Path) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"data_dir": str(data_dir), "tasks": {"r": config_utils.text_task(type="retrieval", dataset=DATASET)}},
      "train": {"batch_size": 8}, "model": {"pretrained": "minilm"}})


@pytest.mark.parametrize("name", [n for n in HOSTILE.values() if n], ids=[k for k, n in HOSTILE.items() if n])
def test_mine_refuses_a_hostile_name_before_embedding_anything(untouched, monkeypatch, name):
  def must_not_load(*args, **kwargs):
    raise AssertionError("mine embedded texts before checking --name")
  monkeypatch.setattr(encode, "load", must_not_load)
  with pytest.raises(ConfigError) as e:
    mine.mine(_mine_config(untouched / "data"), "r", "minilm", name, top_k=5, num_negatives=2, margin_abs=0.95,
              margin_rel=0.95, batch_size=8)
  _one_line(e.value, "--name=")


def test_mine_refuses_a_default_name_that_is_not_plain(untouched, monkeypatch):
  monkeypatch.setattr(encode, "load", lambda *a, **k: pytest.fail("mine embedded texts before checking the name"))
  with pytest.raises(ConfigError) as e:  # the default name is <task>_<model directory's name>
    mine.mine(_mine_config(untouched / "data"), "r", str(untouched / "a model dir"), "", top_k=5, num_negatives=2,
              margin_abs=0.95, margin_rel=0.95, batch_size=8)
  _one_line(e.value, "the default --name", "r_a model dir", "(pass --name)")


def _write_mined(directory, n: int = 3):
  return mined_negatives.write_mined_negatives(
      directory, source_dataset=DATASET, split="train", query_field="query", doc_field="positive",
      negatives=np.full((n, 1), -1), scores=np.zeros((n, 1)), meta={})


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_mined_writer_refuses_hostile_names(untouched, name):
  with pytest.raises(ConfigError) as e:
    _write_mined(mined_negatives.mined_dir(untouched / "data", name, "--name"))
  _one_line(e.value, "--name=")


def test_mined_writer_refuses_paths_outside_a_mined_store(untouched):
  for directory in (untouched / SENTINEL, untouched / "data" / "mined" / ".." / SENTINEL,
                    untouched / "data" / DATASET):
    with pytest.raises(ConfigError) as e:
      _write_mined(directory)
    _one_line(e.value, "<data_dir>/mined/<name>")


def test_mined_writer_replaces_only_a_mined_set(root):
  mined = root / "data" / "mined"
  foreign = mined / "notaset"
  foreign.mkdir()
  (foreign / "important.txt").write_text("not a mined set", encoding="utf-8")
  (mined / "link").symlink_to(root / SENTINEL, target_is_directory=True)
  fake = mined / "fake"
  fake.mkdir()
  (fake / "meta.json").write_text(json.dumps({"format": "something else"}), encoding="utf-8")
  (mined / "afile").write_text("a file", encoding="utf-8")
  try:
    before = _snapshot(root)
    for name, why in (("notaset", "it is not a mined hard-negative set"), ("link", "symbolic link"),
                      ("fake", "it is not a mined hard-negative set"), ("afile", "it is not a mined")):
      with pytest.raises(ConfigError) as e:
        _write_mined(mined_negatives.mined_dir(root / "data", name))
      _one_line(e.value, why, str(mined / name))
    assert _snapshot(root) == before
    # A set it wrote is replaced (and nothing is left behind next to it).
    _write_mined(mined_negatives.mined_dir(root / "data", "good"), n=5)
    assert mined_negatives.read_mined_negatives(mined / "good").negatives.shape == (5, 1)
    assert sorted(p.name for p in mined.iterdir()) == sorted(["afile", "fake", "good", "link", "notaset"])
  finally:
    for path in (foreign, fake):
      for f in path.iterdir():
        f.unlink()
      path.rmdir()
    (mined / "link").unlink()
    (mined / "afile").unlink()


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_prepare_files_refuses_hostile_names(untouched, name):
  with pytest.raises(ConfigError) as e:
    own_dataset.prepare_files(name, untouched / "pairs.jsonl", data_dir=untouched / "data")
  _one_line(e.value, "--name=")


def _tasks_config(data_dir: pathlib.Path, **task) -> ml_collections.ConfigDict:
  task = {"type": "retrieval", "dataset": DATASET, **task}
  return ml_collections.ConfigDict({"data_dir": str(data_dir), "tasks": {"r": config_utils.text_task(**task)}})


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_config_dataset_names_are_refused(untouched, name):
  with pytest.raises(ConfigError) as e:
    text_tasks.resolve_tasks(_tasks_config(untouched / "data", dataset=name), 8)
  _one_line(e.value, "config.data.tasks.r.dataset=")


@pytest.mark.parametrize("name", [n for n in HOSTILE.values() if n], ids=[k for k, n in HOSTILE.items() if n])
def test_config_mined_names_are_refused(untouched, name):
  """A task's mined set name is refused where the config is checked, or else where it is joined onto the data dir
  (before anything is read)."""
  data_dir = untouched / "data"
  with pytest.raises(ConfigError) as e:
    specs = text_tasks.resolve_tasks(_tasks_config(data_dir, mined=name, num_negatives=1), 8)
    text_batches.read_mined_for(specs["r"], str(data_dir), len(sources.open_split(DATASET, data_dir, "train")))
  _one_line(e.value, "mined")


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_config_mixture_names_are_refused(untouched, name):
  data_config = ml_collections.ConfigDict({"data_dir": str(untouched / "data"), "mixture": {name: 1.0}},
                                         allow_dotted_keys=True)  # as a recipe's dict may hold
  with pytest.raises(ConfigError) as e:
    pipeline.make_train_dataset(data_config, Tokenizer(word_tokenizer()), batch_size=8, max_text_len=8,
                                image_size=16, seed=0)
  _one_line(e.value, "config.data.mixture")


@pytest.mark.parametrize("name", HOSTILE.values(), ids=HOSTILE.keys())
def test_tokenizer_dataset_names_are_refused(untouched, name):
  with pytest.raises(ConfigError) as e:
    tokenizer_lib.dataset_tokenizer_path(untouched / "data", name)
  _one_line(e.value, "config.model.tokenizer=")


@pytest.mark.parametrize("name", [n for n in HOSTILE.values() if n], ids=[k for k, n in HOSTILE.items() if n])
def test_run_tokenizer_with_a_hostile_name_is_one_error_and_writes_nothing(untouched, tmp_path, monkeypatch, name):
  """config.model.tokenizer (a pretrained name, a directory or a dataset name of the data dir): a hostile value
  reads nothing it should not and writes no tokenizer into the run."""
  workdir = tmp_path / "run" / "work"
  workdir.mkdir(parents=True)
  monkeypatch.chdir(workdir)  # relative names resolve inside the empty run, not in the project
  config = models.resolve(text_config())
  config.tokenizer = name
  with pytest.raises(UserError) as e:
    run_lib.run_tokenizer(workdir, config, str(untouched / "data"))
  _one_line(e.value, "tokenizer")
  assert not any(workdir.iterdir())


def test_run_tokenizer_reads_a_datasets_own_tokenizer(root, tmp_path):
  """The positive control of the above: the dataset's name itself is taken."""
  config = models.resolve(text_config())
  config.tokenizer = DATASET
  tok = run_lib.run_tokenizer(tmp_path, config, str(root / "data"))
  assert tok == Tokenizer.from_file(root / "data" / DATASET / "tokenizer.json")


# Exports: --overwrite replaces only a previous export.

@pytest.fixture(scope="module")
def text_model():
  config = text_config()
  tokenizer = Tokenizer(word_tokenizer())
  model = models.kind_of(config).build(config, tokenizer.vocab_size)
  return config, random_params(model, config), tokenizer


def test_export_overwrite_refuses_what_is_not_an_export(text_model, tmp_path, monkeypatch):
  config, params, tokenizer = text_model
  home = tmp_path / "home"
  (home / ".ssh").mkdir(parents=True)
  (home / ".ssh" / "id_rsa").write_text("secret", encoding="utf-8")
  (home / "config.json").write_text("{}", encoding="utf-8")  # one of an export's files is not enough
  monkeypatch.setenv("HOME", str(home))
  exported = export.export_text_model(config, params, tokenizer, tmp_path / "exported")
  (tmp_path / "link").symlink_to(exported, target_is_directory=True)
  (tmp_path / "afile").write_text("a file", encoding="utf-8")
  before = _snapshot(tmp_path)
  for output, why in (("~", "not a previous export (it lacks model.safetensors"), (tmp_path / "link", "symbolic link"),
                      (tmp_path / "afile", "not a previous export"), ("/", "filesystem root")):
    with pytest.raises(ConfigError) as e:
      export.export_text_model(config, params, tokenizer, output, overwrite=True)
    _one_line(e.value, "--output", why)
  assert _snapshot(tmp_path) == before
  # The positive control: a previous export is replaced by the same files.
  again = export.export_text_model(config, params, tokenizer, exported, overwrite=True)
  assert again == exported and _snapshot(tmp_path) == before  # byte-identical files, no leftovers
  assert {p.name for p in again.iterdir()} >= set(export.EXPORT_MARKERS)


# Dataset builds: the stale-directory removal stays inside the data dir.

def test_rebuild_refuses_a_dataset_folder_that_leads_outside(root, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  outside = tmp_path / "elsewhere" / own_dataset.DATASET_VERSION
  outside.mkdir(parents=True)
  (outside / "keep.txt").write_text("outside the data dir", encoding="utf-8")
  (data_dir / "linked").symlink_to(outside.parent, target_is_directory=True)
  before = _snapshot(tmp_path)
  target = data_dir / "linked" / own_dataset.DATASET_VERSION
  with pytest.raises(ConfigError) as e:
    build.write_dataset("linked", None, target)  # refused before the builder is used
  _one_line(e.value, "outside", str(data_dir.resolve()))
  with pytest.raises(ConfigError) as e:
    build.write_dataset("x", None, data_dir / ".." / own_dataset.DATASET_VERSION)
  _one_line(e.value, "the dataset name=")
  assert _snapshot(tmp_path) == before


# No network at run time.

class _NoNetwork:
  """Monkeypatches socket connections (and name resolution) to fail for every non-loopback address, recording the
  attempts."""

  def __init__(self, monkeypatch):
    self.attempts = []
    connect, create, getaddrinfo = socket.socket.connect, socket.create_connection, socket.getaddrinfo

    def loopback(host) -> bool:
      return host in ("localhost", "::1", "") or str(host).startswith("127.")

    def guarded_connect(sock, address):
      if sock.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
        self.attempts.append(address)
        raise OSError(f"network access to {address} during a test that must not reach the network")
      return connect(sock, address)

    def guarded_create(address, *args, **kwargs):
      if not loopback(address[0]):
        self.attempts.append(address)
        raise OSError(f"network access to {address} during a test that must not reach the network")
      return create(address, *args, **kwargs)

    def guarded_getaddrinfo(host, *args, **kwargs):
      if host is not None and not loopback(host):
        self.attempts.append(host)
        raise OSError(f"name lookup of {host} during a test that must not reach the network")
      return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def test_prepare_read_and_export_reach_no_network(text_model, tmp_path, monkeypatch):
  guard = _NoNetwork(monkeypatch)
  with pytest.raises(OSError, match="must not reach the network"):  # the guard works
    socket.create_connection(("192.0.2.1", 80), timeout=1)
  assert guard.attempts == [("192.0.2.1", 80)]
  guard.attempts.clear()
  records = [{"query": f"q {i}", "positive": f"p {i}"} for i in range(20)]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  data_dir = own_dataset.prepare_files("offline", tmp_path / "pairs.jsonl", data_dir=tmp_path / "data")
  read = sum(len(sources.read_all("offline", data_dir, split)) for split in ("train", "test"))
  config, params, tokenizer = text_model
  out = export.export_text_model(config, params, tokenizer, tmp_path / "exported")
  embeddings = encode.load(str(out)).encode(["q 1", "p 2"])
  assert read == len(records) and embeddings.shape[0] == 2 and np.isfinite(embeddings).all()
  assert guard.attempts == []
