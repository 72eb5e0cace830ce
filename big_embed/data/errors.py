"""The one exception type of the data layer, and the command that fixes most of its causes."""

from __future__ import annotations

import os

from big_embed.errors import UserError


class DataError(UserError, RuntimeError):
  """A dataset is missing, incomplete or corrupt, or its sources cannot be found."""


def prepare_command(data_dir: str | os.PathLike[str] | None, names: tuple[str, ...],
                    overwrite: bool = False) -> str:
  """Returns the shell command that builds `names` into `data_dir`.

  Args:
    data_dir: the data directory to name with `--data_dir` (None: leave the flag out).
    names: CLI names of the datasets.
    overwrite: whether to add `--overwrite` (to rebuild a corrupt dataset).

  Returns:
    e.g. "python -m big_embed.data.prepare emoji fashion_mnist --data_dir /data".
  """
  cmd = ["python -m big_embed.data.prepare", *names]
  if data_dir is not None:
    cmd.append(f"--data_dir {os.fspath(data_dir)}")
  if overwrite:
    cmd.append("--overwrite")
  return " ".join(cmd)
