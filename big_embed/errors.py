"""Errors that mean "the input is wrong": one base class, and the one handler every command line uses.

Every error a user can fix (a config field, a missing dataset, a full disk, a mesh that does not fit the devices)
derives from `UserError`; its message names the problem and the fix. Entry points wrap their work in
`exit_on_user_error()`, which prints such an error as one `error: ...` line, without a traceback, and exits 1.
"""

from __future__ import annotations

import contextlib
import sys


class UserError(Exception):
  """A problem with the config, the data or the environment that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A config field, a recipe argument or a command-line flag is wrong."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@contextlib.contextmanager
def exit_on_user_error():
  """Runs the body; a `UserError` is printed as one `error: ...` line on stderr and the process exits with 1."""
  try:
    yield
  except UserError as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)
