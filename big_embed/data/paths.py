"""Where prepared datasets and the tokenizer live.

Resolution order of the data directory: explicit value > `$BIG_EMBED_DATA_DIR` >
`~/.cache/big_embed/datasets`.
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "BIG_EMBED_DATA_DIR"
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/big_embed/datasets")
TOKENIZER_FILENAME = "tokenizer.json"


def resolve_data_dir(flag_value: str | os.PathLike[str] | None) -> pathlib.Path:
  """Returns the data directory (absolute, `~` expanded; it may not exist yet).

  Args:
    flag_value: an explicit directory; None or "" means "not given".
  """
  for value in (flag_value, os.environ.get(ENV_VAR)):
    if value is not None and os.fspath(value) != "":
      return pathlib.Path(value).expanduser().absolute()
  return DEFAULT_DATA_DIR.expanduser().absolute()


def tokenizer_path(data_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """Returns `<data_dir>/tokenizer.json` (data_dir resolved as above)."""
  return resolve_data_dir(data_dir) / TOKENIZER_FILENAME
