"""Tests of the data layer on the real datasets, prepared once per session into a temp directory."""

import hashlib
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from big_embed.data import DataError, build, corpora, debian, paths, pipeline, sources
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.data.corpora import emoji, fashion_mnist
from big_embed.errors import ConfigError

BATCH, SIZE, MAX_LEN = 16, 32, 16


@pytest.fixture(scope="session")
def tok(data_dir):
  return tokenizer_lib.load_tokenizer(data_dir)


def _config(data_dir, **overrides):
  """`config.data` of the quickstart mixture; `overrides` replace fields whole (a mixture is not merged)."""
  return ml_collections.ConfigDict({**dict(data_dir=str(data_dir), mixture={"emoji": 0.5, "fashion_mnist": 0.5},
                                           worker_count=0, num_threads=2), **overrides})


def _stream(cfg, tok, *, batch=BATCH, image_size=SIZE, seed=0, **kw):
  return pipeline.make_train_dataset(cfg, tok, batch_size=batch, max_text_len=MAX_LEN, image_size=image_size,
                                     seed=seed, **kw)


def _fashion_captions():
  """Naive reference: every template filled with every natural class name."""
  return [t.format(n) for t in fashion_mnist.PROMPT_TEMPLATES for n in fashion_mnist.PROMPT_NAMES]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _ids(data_dir, split):
  src = sources.open_split("emoji", data_dir, split)
  return [r["id"].decode() for r in src.__getitems__(range(len(src)))]


# Paths and errors.

def test_resolve_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "env"))
  assert paths.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
  assert paths.resolve_data_dir(None) == tmp_path / "env"
  assert paths.resolve_data_dir("") == tmp_path / "env"
  monkeypatch.delenv(paths.ENV_VAR)
  assert paths.resolve_data_dir(None) == paths.DEFAULT_DATA_DIR.expanduser().absolute()


def test_missing_dataset_raises_with_command(tmp_path, tok):
  expected = f"python -m big_embed.data.prepare emoji fashion_mnist --data_dir {tmp_path}"
  with pytest.raises(DataError, match="'emoji'") as e:
    _stream(_config(tmp_path), tok)
  assert expected in str(e.value)
  with pytest.raises(DataError, match="'fashion_mnist'") as e:
    pipeline.load_zero_shot_set("fashion_mnist", tmp_path, image_size=SIZE)
  assert expected in str(e.value)
  with pytest.raises(DataError) as e:
    tokenizer_lib.load_tokenizer(tmp_path)
  assert expected in str(e.value)


def test_corrupt_record_raises(data_dir, tmp_path):
  src_dir = sources.dataset_dir("fashion_mnist", data_dir)
  dst_dir = sources.dataset_dir("fashion_mnist", tmp_path)
  dst_dir.mkdir(parents=True)
  for f in src_dir.iterdir():
    data = f.read_bytes()
    if "test.array_record" in f.name:  # Overwrite the middle of the file.
      data = data[:len(data) // 2] + b"\xff" * 4096 + data[len(data) // 2 + 4096:]
    (dst_dir / f.name).write_bytes(data)
  with pytest.raises(DataError, match=r"Corrupt fashion_mnist .*record") as e:
    pipeline.load_zero_shot_set("fashion_mnist", tmp_path, image_size=28)
  assert "--overwrite" in str(e.value)


def test_a_split_read_whole_is_parsed_once_until_its_files_change(data_dir, tmp_path):
  src_dir = sources.dataset_dir("emoji", data_dir)
  dst_dir = sources.dataset_dir("emoji", tmp_path)
  dst_dir.mkdir(parents=True)
  for f in src_dir.iterdir():
    (dst_dir / f.name).write_bytes(f.read_bytes())
  first, again = sources.read_all("emoji", tmp_path, "test"), sources.read_all("emoji", tmp_path, "test")
  assert again is not first and all(a is b for a, b in zip(first, again)) and len(first) == 747
  image = next(v for v in first[0].values() if isinstance(v, np.ndarray) and v.ndim == 3)
  with pytest.raises(ValueError, match="read-only"):
    image[0, 0, 0] = 0
  data_file = next(f for f in dst_dir.iterdir() if "test.array_record" in f.name)
  data = data_file.read_bytes()
  data_file.write_bytes(data[:len(data) // 2] + b"\xff" * 4096 + data[len(data) // 2 + 4096:])
  with pytest.raises(DataError, match=r"Corrupt emoji .*record"):  # damaged after the first read: read again
    sources.read_all("emoji", tmp_path, "test")


def test_missing_package_message(monkeypatch):
  monkeypatch.setattr(os, "geteuid", lambda: 1000)  # Not root: never runs apt-get.
  with pytest.raises(DataError, match="sudo apt-get install -y big-embed-no-such-package"):
    debian.ensure_package("big-embed-no-such-package")


def test_prepare_skips_built_datasets(data_dir, capsys):
  tokenizer_file = paths.tokenizer_path(data_dir)
  mtime = tokenizer_file.stat().st_mtime_ns
  build.prepare(["emoji", "fashion_mnist"], data_dir)
  assert capsys.readouterr().out.count("already built") == 2
  assert tokenizer_file.stat().st_mtime_ns == mtime  # Nothing built: tokenizer kept.


def test_prepare_rejects_unknown_names(tmp_path):
  with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; known: .*emoji, fashion_mnist"):
    build.prepare(["emoji", "mnist"], tmp_path)
  assert not list(tmp_path.iterdir())  # nothing built before the check


# The corpus registry.

def test_field_kinds():
  f = tfds.features
  cases = {"text": f.Text(), "text_seq": f.Sequence(f.Text()), "class": f.ClassLabel(names=["a", "b"]),
           "class_seq": f.Sequence(f.ClassLabel(names=["a"])), "float": f.Scalar(np.float32),
           "image": f.Image(shape=(4, 4, 3))}
  for kind, feature in cases.items():
    assert corpora.field_kind(feature) == kind, kind
  assert corpora.field_kind(f.Tensor(shape=(28, 28), dtype=np.uint8)) == "image"
  assert corpora.field_kind(f.Tensor(shape=(3,), dtype=np.float32)) == "other"
  assert corpora.field_kind(f.Sequence(f.Scalar(np.int64))) == "other"


def test_every_corpus_declares_its_builders_fields(tmp_path):
  expected = {"bible", "wordnet", "debian_packages", "fortunes", "foldoc", "lee50", "wordsim353", "simlex999"}
  assert expected <= set(corpora.names("text")) and {"emoji", "fashion_mnist"} <= set(corpora.names("image"))
  for corpus in corpora.entries():
    features = corpus.builder(data_dir=str(tmp_path), file_format=sources.FILE_FORMAT).info.features
    assert {k: corpora.field_kind(v) for k, v in features.items()} == dict(corpus.fields), corpus.name
  assert len({c.builder.name for c in corpora.entries()}) == len(corpora.names())


def test_registry_rejects_bad_entries():
  builder = corpora.get("fortunes").builder
  good = dict(name="x", builder=builder, kind="text", fields={"text": "text", "category": "class"})
  for change, match in ((dict(name="a-b"), "identifier"), (dict(kind="audio"), "kind"),
                        (dict(fields={"text": "words"}), "fields must map"),
                        (dict(probe=("text", "text")), "probe field 'text'"),
                        (dict(retrieval=("text", "missing")), "retrieval field 'missing'"),
                        (dict(kind="image"), "an image corpus needs image_text")):
    with pytest.raises(ValueError, match=match):
      corpora.Corpus(**{**good, **change})
  with pytest.raises(ValueError, match="clashes with the registered corpus 'fortunes'"):
    corpora.register(corpora.Corpus(**good))  # same TFDS builder name as fortunes
  assert "x" not in corpora.names()


# Prepared datasets.

def test_prepared_splits_are_the_registered_ones(data_dir):
  for name in ("emoji", "fashion_mnist"):
    assert tuple(sources.make_builder(name, data_dir).info.splits) == corpora.get(name).splits


def test_dataset_sizes(data_dir):
  n = {(name, split): len(sources.open_split(name, data_dir, split))
       for name in ("emoji", "fashion_mnist") for split in ("train", "test")}
  assert n["fashion_mnist", "train"] == 60_000 and n["fashion_mnist", "test"] == 10_000
  total = n["emoji", "train"] + n["emoji", "test"]
  assert 3_000 < total < 4_500, n
  assert 0.15 < n["emoji", "test"] / total < 0.25, n


def test_emoji_splits_disjoint_and_deterministic(data_dir):
  train, test = _ids(data_dir, "train"), _ids(data_dir, "test")
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  assert not set(train) & set(test)
  assert all(emoji.is_test(i) for i in test) and not any(emoji.is_test(i) for i in train)
  # The split hash is a fixed function of the id (sha1), not Python's salted hash().
  digest = hashlib.sha1("😀".encode()).digest()
  assert emoji.is_test("😀") == (int.from_bytes(digest[:8], "big") % 100 < 20)
  assert _ids(data_dir, "test") == test  # Same order on every read.


def test_emoji_records(data_dir):
  src = sources.open_split("emoji", data_dir, "test")
  records = src.__getitems__(range(0, len(src), 7))
  for r in records:
    assert r["image"].shape == (64, 64, 3) and r["image"].dtype == np.uint8
    assert (r["image"] < 250).any(), r["name"]  # Not blank white.
    assert r["name"].decode().strip()
    assert all(k.decode().strip() for k in r["keywords"])
  assert np.mean([len(r["keywords"]) > 0 for r in records]) > 0.9


def test_fashion_mnist_records(data_dir):
  src = sources.open_split("fashion_mnist", data_dir, "test")
  r = src[0]
  assert r["image"].shape == (28, 28) and r["image"].dtype == np.uint8 and r["image"].any()
  assert 0 <= r["label"] < 10


# Tokenizer.

def test_tokenizer(tok):
  assert tok.pad_id == 0 and 1_000 < tok.vocab_size <= tokenizer_lib.DEFAULT_VOCAB_SIZE
  texts = ["a photo of a t-shirt.", "grinning face", "Piñata", " ", "x" * 200,
           " ".join(["flag: United States"] * 10), ""]
  ids = tok.encode_batch(texts, MAX_LEN)
  assert ids.shape == (len(texts), MAX_LEN) and ids.dtype == np.int32
  assert (ids[:-1] != 0).any(axis=1).all()  # Every non-empty text has a token.
  assert (ids[-1] == 0).all()
  assert (ids[5] != 0).all()  # Truncated to MAX_LEN.
  assert tok.decode(ids[1]) == "grinning face"
  # Round trip through a string, as stored with a checkpoint.
  restored = tokenizer_lib.Tokenizer.from_str(tok.to_str())
  np.testing.assert_array_equal(restored.encode_batch(texts, MAX_LEN), ids)
  assert restored == tok


def test_tokenizer_covers_training_captions(tok):
  texts = _fashion_captions()
  assert (tok.encode_batch(texts, 32) != tok.unk_id).all()
  assert sorted(fashion_mnist.caption_texts(None)) == sorted(texts)


# Training pipeline.

def test_batch_shapes(data_dir, tok):
  batch = next(iter(_stream(_config(data_dir), tok)))
  assert batch["image"].shape == (BATCH, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (BATCH, MAX_LEN) and batch["text"].dtype == np.int32
  assert (batch["text"] != 0).any(axis=1).all()
  assert batch["ids"].shape == (BATCH,) and batch["ids"].dtype == np.int32
  # Half the batch is Fashion-MNIST (ids = its class 0..9), half emoji (ids >= 16, one per emoji).
  fashion = batch["ids"] < 10
  assert fashion.sum() == BATCH // 2 and (batch["ids"][~fashion] >= 16).all()


def test_deterministic(data_dir, tok):
  make = lambda seed: iter(_stream(_config(data_dir), tok, seed=seed))
  _assert_same(_take(make(1), 3), _take(make(1), 3))
  assert not np.array_equal(next(make(1))["image"], next(make(2))["image"])


def test_resume_from_state(data_dir, tok):
  ds = _stream(_config(data_dir), tok, seed=3)
  it = iter(ds)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(ds)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), expected)


def test_process_sharding(data_dir, tok):
  """The global batch is split over the processes, which read disjoint records: their first batches differ."""
  make = lambda i: next(iter(_stream(_config(data_dir), tok, process_index=i, process_count=2)))
  first, second = make(0), make(1)
  assert first["image"].shape == second["image"].shape == (BATCH // 2, SIZE, SIZE, 3)
  assert first["text"].shape == (BATCH // 2, MAX_LEN)
  assert not np.array_equal(first["image"], second["image"])
  with pytest.raises(ConfigError, match=r"batch_size=16 is not divisible by the 3 processes"):
    _stream(_config(data_dir), tok, process_count=3)


def test_mixture_proportions_and_captions(data_dir, tok):
  cfg = _config(data_dir, mixture={"emoji": 0.25, "fashion_mnist": 0.75})
  it = iter(_stream(cfg, tok))
  fashion_texts = {tuple(row) for row in tok.encode_batch(_fashion_captions(), MAX_LEN)}
  rows = np.concatenate([b["text"] for b in _take(it, 8)])  # [8 * BATCH, MAX_LEN]
  is_fashion = np.array([tuple(r) in fashion_texts for r in rows])
  assert 0.65 < is_fashion.mean() < 0.85
  # Emoji captions vary (name, templates, keywords).
  assert len({tuple(r) for r in rows[~is_fashion]}) > 0.9 * (~is_fashion).sum()


def test_single_source_mixture(data_dir, tok):
  cfg = _config(data_dir, mixture={"emoji": 1.0, "fashion_mnist": 0.0})
  batch = next(iter(_stream(cfg, tok, image_size=64)))
  assert batch["image"].shape == (BATCH, 64, 64, 3)
  for mixture in ({"mnist": 1.0}, {"bible": 1.0}, {}):
    with pytest.raises(ConfigError, match="config.data.mixture must give positive weights to some of"):
      _stream(_config(data_dir, mixture=mixture), tok)


# Evaluation sets.

def test_zero_shot_set(data_dir):
  zs = pipeline.load_zero_shot_set("fashion_mnist", data_dir, image_size=SIZE)
  assert zs["images"].shape == (10_000, SIZE, SIZE, 3) and zs["images"].dtype == np.uint8
  assert zs["labels"].shape == (10_000,) and zs["labels"].dtype == np.int32
  np.testing.assert_array_equal(np.bincount(zs["labels"]), [1_000] * 10)
  assert zs["class_names"][0] == "t-shirt" and zs["class_names"][-1] == "ankle boot"
  assert (zs["images"][..., 0] == zs["images"][..., 2]).all()  # Grayscale as RGB.
  assert zs["templates"][0] == "a photo of a {}." and len(zs["templates"]) == 8
  with pytest.raises(ConfigError, match="'emoji' has no zero-shot classes; datasets with one: fashion_mnist"):
    pipeline.load_zero_shot_set("emoji", data_dir, image_size=SIZE)


def test_retrieval_set(data_dir):
  rs = pipeline.load_retrieval_set("emoji", data_dir, image_size=SIZE)
  n = len(rs["ids"])
  assert rs["images"].shape == (n, SIZE, SIZE, 3) and rs["images"].dtype == np.uint8
  assert len(rs["captions"]) == n and all(rs["captions"])
  assert rs["ids"] == _ids(data_dir, "test")
  src = sources.open_split("emoji", data_dir, "test")
  assert rs["captions"] == [r["name"].decode() for r in src.__getitems__(range(len(src)))]
  with pytest.raises(ConfigError, match="'fashion_mnist' has no retrieval captions"):
    pipeline.load_retrieval_set("fashion_mnist", data_dir, image_size=SIZE)
  with pytest.raises(ConfigError, match="'bible' is a text corpus"):
    pipeline.load_retrieval_set("bible", data_dir, image_size=SIZE)


def test_mismatched_captions_give_matching_scores(data_dir, tok):
  cfg = _config(data_dir, mismatched_fraction=0.5)
  plain = next(iter(_stream(_config(data_dir), tok)))
  pairs = next(iter(_stream(cfg, tok)))
  np.testing.assert_array_equal(pairs["image"], plain["image"])
  swapped = (pairs["text"] != plain["text"]).any(axis=1)
  assert 0 < swapped.sum() <= BATCH // 2
  # A row scores 1 exactly when its caption came from an image with the same ids (a kept row always does).
  kept = ~swapped
  assert (pairs["score"][kept] == 1).all()
  assert set(np.unique(pairs["score"])) <= {0.0, 1.0} and (pairs["score"] == 0).any()
  with pytest.raises(ConfigError, match="mismatched_fraction"):
    _stream(_config(data_dir, mismatched_fraction=1.5), tok)


def test_removed_but_not_purged_debian_package_counts_as_missing(monkeypatch):
  """`apt-get remove` keeps a dpkg entry (config files) whose data files are gone: it must be reinstalled."""
  import subprocess  # pylint: disable=g-import-not-at-top
  from big_embed.data import debian  # pylint: disable=g-import-not-at-top

  def fake_run(cmd, **unused):
    if cmd[0] == "dpkg-query":
      return subprocess.CompletedProcess(cmd, 0, "deinstall ok config-files", "")
    return subprocess.CompletedProcess(cmd, 0, "/etc/dictd/foldoc.conf\n", "")

  monkeypatch.setattr(debian.shutil, "which", lambda name: f"/usr/bin/{name}")
  monkeypatch.setattr(debian.subprocess, "run", fake_run)
  assert debian._installed_files("dict-foldoc") is None
