"""Test-wide setup: 8 fake CPU devices (set before anything touches the JAX backend), prepared data once."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Both quickstart datasets and the tokenizer, built from the Debian sources once per session (~15 s)."""
  from big_embed.data import build  # pylint: disable=g-import-not-at-top
  return build.prepare(["emoji", "fashion_mnist"], tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def text_data_dir(tmp_path_factory):
  """Every text corpus (`corpora.names("text")`), built once per session from the Debian sources,
  the apt lists and the gensim wheel (~50-70 s; slowest: wordnet ~27 s, debian_packages ~14 s)."""
  import time  # pylint: disable=g-import-not-at-top
  from big_embed.data import build, corpora  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  directory = build.prepare(list(corpora.names("text")), tmp_path_factory.mktemp("text_datasets"))
  print(f"text_data_dir: all text corpora built in {time.perf_counter() - start:.0f} s", flush=True)
  return directory
