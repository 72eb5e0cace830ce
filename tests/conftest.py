"""Test-wide setup: 8 fake CPU devices (set before anything touches the JAX backend), prepared data once."""

import fcntl
import os
import shutil
import tempfile

_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if _FAKE_DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit the controller's
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAKE_DEVICES}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation dominates test time; share compiled programs between tests and the subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"big_embed_test_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import hypothesis  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Property tests draw the same examples on every run, so a CI result is reproducible.
hypothesis.settings.register_profile("big_embed", derandomize=True)
hypothesis.settings.load_profile("big_embed")


def _built_once(tmp_path_factory, name: str, build):
  """`build(directory)` once per test session: pytest-xdist workers share the session's base directory, and the
  first to arrive builds under a lock while the others wait for it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # each worker's base directory lies in the session's
  directory, done = root / name, root / f"{name}.complete"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      build(directory)
      done.touch()
  return directory


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Both quickstart datasets and the tokenizer, built from the Debian sources once per session (~15 s)."""
  from big_embed.data import build  # pylint: disable=g-import-not-at-top
  return _built_once(tmp_path_factory, "datasets", lambda d: build.prepare(["emoji", "fashion_mnist"], d))


@pytest.fixture(scope="session")
def text_data_dir(tmp_path_factory):
  """Every text corpus (`corpora.names("text")`), built once per session from the Debian sources,
  the apt lists and the gensim wheel (~50-70 s; slowest: wordnet ~27 s, debian_packages ~14 s)."""
  import time  # pylint: disable=g-import-not-at-top
  from big_embed.data import build, corpora  # pylint: disable=g-import-not-at-top

  def build_all(directory):
    start = time.perf_counter()
    build.prepare(list(corpora.names("text")), directory)
    print(f"text_data_dir: all text corpora built in {time.perf_counter() - start:.0f} s", flush=True)
  return _built_once(tmp_path_factory, "text_datasets", build_all)
