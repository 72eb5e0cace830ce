"""Where prepared datasets and the tokenizer live, and the checks on names and paths inside them.

Resolution order of the data directory: explicit value > `$BIG_EMBED_DATA_DIR` >
`~/.cache/big_embed/datasets`.

A name that becomes a directory (a dataset, a mined set, a tokenizer's dataset) passes `check_name` where it is
joined onto its directory; what a store deletes or replaces passes `check_inside` (the resolved path lies inside
the store's own folder).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Callable

from big_embed.errors import ConfigError

ENV_VAR = "BIG_EMBED_DATA_DIR"
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/big_embed/datasets")
TOKENIZER_FILENAME = "tokenizer.json"
MAX_NAME_LENGTH = 100
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]*")
NAME_RULE = (f"letters, digits, '.', '_' and '-', not starting with '.' or '-', at most {MAX_NAME_LENGTH} "
             "characters")


def check_name(name: str, what: str) -> str:
  """Returns `name` if it is safe as one directory name, else raises.

  Args:
    name: the value, e.g. a flag's or a config field's.
    what: how the user gave it, e.g. "--name" or "config.data.tasks.defs.mined".

  Raises:
    ConfigError: `name` is not a str, is empty, "." or "..", holds a path separator, NUL, a control character or
      a character outside [A-Za-z0-9._-], starts with "." or "-", or is longer than MAX_NAME_LENGTH; one line
      naming `what`, the value and the rule.
  """
  if not isinstance(name, str):
    problem = f"is not a string ({type(name).__name__})"
  elif not name:
    problem = "is empty"
  elif name in (".", ".."):
    problem = "names a directory itself"
  elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
    problem = "holds a path separator"
  elif any(ord(c) < 32 or ord(c) == 127 for c in name):
    problem = "holds a NUL or control character"
  elif not _NAME_CHARS.fullmatch(name):
    problem = f"holds {sorted(set(_NAME_CHARS.sub('', name)))[0]!r}"
  elif name[0] in ".-":
    problem = f"starts with {name[0]!r}"
  elif len(name) > MAX_NAME_LENGTH:
    problem = f"has {len(name)} characters"
  else:
    return name
  shown = name if not isinstance(name, str) or len(name) <= 60 else name[:40] + "..."
  raise ConfigError(f"{what}={shown!r} {problem}; a name that becomes a directory must be plain: {NAME_RULE}")


def check_inside(path: str | os.PathLike[str], store: str | os.PathLike[str], what: str) -> pathlib.Path:
  """Returns `path` resolved if it lies strictly inside `store` (both resolved, symbolic links followed) and is
  not itself a symbolic link; else raises. Whatever a store deletes or replaces passes this first.

  Args:
    path: what is about to be deleted or replaced.
    store: the folder it must lie in (e.g. `<data_dir>/mined`).
    what: what `path` is, for the message (e.g. "the mined set to replace").

  Raises:
    ConfigError: `path` is a symbolic link or lies outside `store`.
  """
  path = pathlib.Path(path).expanduser().absolute()
  root = pathlib.Path(store).expanduser().resolve()
  if path.is_symlink():
    raise ConfigError(f"refusing to replace {what} {path}: it is a symbolic link (to {path.resolve()}); remove the "
                      "link yourself")
  resolved = path.resolve()
  if resolved == root or root not in resolved.parents:
    raise ConfigError(f"refusing to replace {what} {path}: it resolves to {resolved}, outside {root}")
  return resolved


def check_replace_target(directory: str | os.PathLike[str], store: str, what: str, is_ours: Callable[[pathlib.Path],
                         bool], marker: str) -> pathlib.Path:
  """Returns `directory` (absolute) if a store may write there: it is `<...>/<store>/<plain name>` and holds nothing
  or something of the store's own (`is_ours`), which is then replaced; `write` uses `replace_directory`.

  Args:
    what: what the store holds, for messages ("a mined hard-negative set").
    marker: how a directory of the store's own is known, for messages ("a meta.json of format 'x'").

  Raises:
    ConfigError: another path, or something not the store's own is there (a file, a symbolic link, a directory
      without the marker).
  """
  directory = pathlib.Path(directory).absolute()
  if directory.parent.name != store:
    raise ConfigError(f"{what} is written to <data_dir>/{store}/<name>, not {directory}")
  check_name(directory.name, f"the name of {what}")
  if directory.is_symlink() or directory.exists():
    check_inside(directory, directory.parent, what)
    if not directory.is_dir() or not is_ours(directory):
      raise ConfigError(f"refusing to replace {directory}: it is not {what} (no {marker}); choose another name or "
                        "move it away yourself")
  return directory


def replace_directory(directory: pathlib.Path, fill: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """Writes `directory` whole or not at all: `fill(tmp)` writes into a temporary sibling, which then takes the
  place of `directory` (an old one is renamed aside first and deleted after). The caller has checked that
  `directory` is its own to replace. Returns `directory`."""
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
  tmp.mkdir()
  old = None
  try:
    fill(tmp)
    if directory.exists():
      old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
      directory.rename(old)
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
  return directory


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
