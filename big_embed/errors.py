"""Errors that mean "the input is wrong": one base class, and the one handler every command line uses.

Every error a user can fix (a config field, a missing dataset, a full disk, a mesh that does not fit the devices)
derives from `UserError`; its message names the problem and the fix. Entry points wrap their work in
`exit_on_user_error()`, which prints such an error as one `error: ...` line, without a traceback, and exits 1.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings


class UserError(Exception):
  """A problem with the config, the data or the environment that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  """A config field, a recipe argument or a command-line flag is wrong."""


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""


@contextlib.contextmanager
def exit_on_user_error():
  """Runs the body; a `UserError` is printed as one `error: ...` line on stderr and the process exits with 1.

  What fails again while the process shuts down after the error (e.g. a log writer's exit hook flushing to the
  full disk the error is about) is the same problem, already reported: it is not printed.
  """
  try:
    yield
  except UserError as err:
    print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)  # one line, always
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    warnings.simplefilter("ignore")  # e.g. the unawaited coroutines of a failed background write
    sys.exit(1)
