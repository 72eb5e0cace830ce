r"""Builds the datasets (TFDS, array_record) and the text tokenizer into the data directory.

Usage:
  python -m big_embed.data.prepare [NAME ...] [--data_dir DIR] [--overwrite]
  python -m big_embed.data.prepare files --name NAME --train FILE [--test FILE] [--data_dir DIR] [--overwrite]
      [--test_percent 10] [--fields COLUMN=ROLE,...] [--image_size 64]

Names: the corpora of `big_embed/data/corpora/` (one module each; docs/datasets.md describes each one and its
licence); an unknown name is answered with the list of known ones.

With no names, builds every dataset. A finished dataset is skipped unless --overwrite. Raw sources
come from Debian packages, installed with apt-get when running as root; `debian_packages` reads the
apt lists (fetching the English descriptions with `apt-get update -o Acquire::Languages=en` when
root and they are missing), and the similarity sets come from the test data of the gensim wheel,
fetched with `pip download`. Text corpora print how many empty or non-UTF-8 source records they
skipped. The tokenizer (`<data_dir>/tokenizer.json`) is retrained on every caption the training
pipeline can produce whenever an image dataset is built, or when it is missing or unreadable.

`files` builds a dataset of your own from a .jsonl, .tsv or .csv file (`big_embed/data/own_files.py`: roles, checks;
`own_dataset.py`: the build and its tokenizer; docs/datasets.md, "Your own data"). Bad records are skipped and
counted, with their first line numbers; the dataset is then found by its name in the data dir.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from big_embed.data import build, corpora, own_dataset, own_files, paths, tokenizer
from big_embed.errors import exit_on_user_error

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, f"Data directory (default: ${paths.ENV_VAR}, else {paths.DEFAULT_DATA_DIR}).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild datasets that are already built.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", tokenizer.DEFAULT_VOCAB_SIZE,
                                   "Maximum tokenizer vocabulary size.")
_NAME = flags.DEFINE_string("name", None, "files: the dataset's name (a lower-case identifier).")
_TRAIN = flags.DEFINE_string("train", None, "files: the training records (.jsonl, .tsv or .csv).")
_TEST = flags.DEFINE_string("test", None, "files: the test records (default: a hash split of --train).")
_TEST_PERCENT = flags.DEFINE_integer("test_percent", own_dataset.DEFAULT_TEST_PERCENT,
                                     "files without --test: the share of records held out, by a hash of the id.")
_FIELDS = flags.DEFINE_string("fields", "", "files: field names that are roles under another name, "
                              "e.g. text=query,doc=positive.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", own_files.DEFAULT_IMAGE_SIZE,
                                   "files: the side of the stored images, in pixels.")
_FILES_FLAGS = ("name", "train", "test", "test_percent", "fields", "image_size")


def _prepare_files(argv: Sequence[str]) -> None:
  if argv[2:]:
    raise app.UsageError(f"unexpected arguments after files: {' '.join(argv[2:])}")
  if not _NAME.value or not _TRAIN.value:
    raise app.UsageError("files needs --name NAME and --train FILE (e.g. python -m big_embed.data.prepare files "
                         "--name my_docs --train pairs.jsonl)")
  own_dataset.prepare_files(_NAME.value, _TRAIN.value, _TEST.value, _DATA_DIR.value,
                            test_percent=_TEST_PERCENT.value, image_size=_IMAGE_SIZE.value,
                            fields=own_files.parse_fields(_FIELDS.value), overwrite=_OVERWRITE.value,
                            vocab_size=_VOCAB_SIZE.value)


def main(argv: Sequence[str]) -> None:
  if argv[1:2] == ["files"]:
    with exit_on_user_error():
      _prepare_files(argv)
    return
  given = [f"--{f}" for f in _FILES_FLAGS if flags.FLAGS[f].present]
  if given:
    raise app.UsageError(f"{', '.join(given)}: only for `prepare files` (python -m big_embed.data.prepare files "
                         "--name NAME --train FILE)")
  names = list(dict.fromkeys(argv[1:])) or list(corpora.names())
  unknown = [n for n in names if n not in corpora.names()]
  if unknown:
    raise app.UsageError(f"Unknown dataset(s) {unknown}; known: {', '.join(corpora.names())} (for your own files: "
                         "python -m big_embed.data.prepare files --name NAME --train FILE)")
  with exit_on_user_error():
    build.prepare(names, _DATA_DIR.value, overwrite=_OVERWRITE.value, vocab_size=_VOCAB_SIZE.value)


if __name__ == "__main__":
  app.run(main)
