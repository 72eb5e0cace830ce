"""Errors that mean "the input is wrong": the entry point prints them as one line, with no traceback."""


class UserError(Exception):
  """A problem with the config, the data or the environment that the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
  pass


class TrainingError(UserError, RuntimeError):
  pass
