"""Errors a user can cause, reported by main.py as one clear sentence."""


class UserError(ValueError):
  """A bad path, config value or dataset: the message is the whole story."""


class DataError(UserError):
  """A dataset is missing, malformed or of the wrong shape."""


class ConfigError(UserError):
  """A config value is missing, out of range or inconsistent."""


class WorkdirError(UserError):
  """The workdir holds something this run must not overwrite."""


class TrainingDiverged(UserError):
  """A train step left NaN or infinite values in the loss or the weights."""
