r"""Builds the datasets (TFDS, array_record) and the text tokenizer into the data directory.

Usage:
  python -m big_embed.data.prepare [NAME ...] [--data_dir DIR] [--overwrite]

Names: the corpora of `big_embed/data/corpora/` (one module each; docs/datasets.md describes each one and its
licence); an unknown name is answered with the list of known ones.

With no names, builds every dataset. A finished dataset is skipped unless --overwrite. Raw sources
come from Debian packages, installed with apt-get when running as root; `debian_packages` reads the
apt lists (fetching the English descriptions with `apt-get update -o Acquire::Languages=en` when
root and they are missing), and the similarity sets come from the test data of the gensim wheel,
fetched with `pip download`. Text corpora print how many empty or non-UTF-8 source records they
skipped. The tokenizer (`<data_dir>/tokenizer.json`) is retrained on every caption the training
pipeline can produce whenever an image dataset is built, or when it is missing or unreadable.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from big_embed.data import build, corpora, paths, tokenizer
from big_embed.data.errors import DataError

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, f"Data directory (default: ${paths.ENV_VAR}, else {paths.DEFAULT_DATA_DIR}).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild datasets that are already built.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", tokenizer.DEFAULT_VOCAB_SIZE,
                                   "Maximum tokenizer vocabulary size.")


def main(argv: Sequence[str]) -> None:
  names = list(dict.fromkeys(argv[1:])) or list(corpora.names())
  unknown = [n for n in names if n not in corpora.names()]
  if unknown:
    raise app.UsageError(f"Unknown dataset(s) {unknown}; known: {', '.join(corpora.names())}")
  try:
    build.prepare(names, _DATA_DIR.value, overwrite=_OVERWRITE.value, vocab_size=_VOCAB_SIZE.value)
  except DataError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
