"""One sentence for what goes wrong in the --config flag.

ml_collections' config_flags loads the --config file and applies its
overrides (--config.batch_size=...) while absl parses the flags. What the
file raises comes through as it is (a TypeError or ValueError wrapped in a
flags.Error that quotes its traceback); a field an override names but the
config lacks comes as ml_collections' KeyError, with its "Did you mean"; a
value of the wrong type as absl's IllegalFlagValueError. `config_flag_error`
turns each into the sentence main.py prints after 'error: '.
"""

from __future__ import annotations

import os
import re
import traceback
from types import CodeType, FrameType
from typing import Iterator, List, Optional, Sequence, Tuple

from absl import flags

# What an override of a config field of each type must hold.
_KINDS = (
    (flags.BooleanParser, 'True or False'),
    (flags.IntegerParser, 'a whole number'),
    (flags.FloatParser, 'a number'),
)


def config_flag_error(
    e: BaseException,
    argv: Sequence[str],
    flag_values: flags.FlagValues = flags.FLAGS,
) -> Optional[str]:
  """The sentence for an error of the --config flag, or None for another.

  Args:
    e: what parsing `argv` raised.
    argv: the command line, program name first.
    flag_values: the flags `argv` was parsed into, --config among them
      (config_flags.DEFINE_config_file).

  Returns:
    One sentence naming the file, or the override, and what is wrong:
    "--config.optimizer.learnig_rate: config has no field learnig_rate (did
    you mean learning_rate?)."; None for an error of another flag.
  """
  if 'config' not in flag_values:
    return None
  # Where the flag's parser loads the file and calls its get_config().
  load = type(flag_values['config'].parser).parse.__code__
  loading = [x for x in _chain(e) if _frames_running(x, load)]
  if loading:
    return _file_error(loading[-1], load)
  if isinstance(e, (AttributeError, KeyError)):
    return _unknown_field_error(e, argv)
  if isinstance(e, flags.IllegalFlagValueError):
    return _value_error(str(e).strip(), flag_values)
  return None


def _chain(e: Optional[BaseException]) -> Iterator[BaseException]:
  """`e` and the exceptions it was raised while handling, outermost first."""
  while e is not None:
    yield e
    e = e.__context__


def _frames_running(e: BaseException, code: CodeType) -> List[FrameType]:
  """The frames of `e`'s traceback that run `code`."""
  return [f for f, _ in traceback.walk_tb(e.__traceback__) if f.f_code is code]


def _file_error(e: BaseException, load: CodeType) -> str:
  """`e`, raised importing the config file or in its get_config()."""
  # `path` as given: the file, then maybe ':' and get_config's argument.
  path = str(_frames_running(e, load)[-1].f_locals.get('path', ''))
  path = path.split(':', 1)[0]
  message = (str(e).strip().splitlines() or [''])[0]
  if isinstance(e, ValueError):
    return message  # A config's ValueError is a sentence for the user.
  if isinstance(e, AttributeError) and getattr(e, 'name', '') == 'get_config':
    return f'the --config file {path} has no get_config() function.'
  missing = _missing_field(e)
  if missing is not None:  # Its code reads a field its config lacks.
    message = f'config has no field {missing[0]}{missing[1]}'
  where = ''
  if isinstance(e, SyntaxError):
    message = e.msg
    if e.filename and not _same_file(e.filename, path):
      where = f' at {e.filename} line {e.lineno}'
    elif e.lineno:
      where = f' at line {e.lineno}'
  else:
    lines = [
        n
        for f, n in traceback.walk_tb(e.__traceback__)
        if _same_file(f.f_code.co_filename, path)
    ]
    if lines:
      where = f' at line {lines[-1]}'
  return (
      f'cannot load the --config file {path} '
      f'({type(e).__name__}{where}: {message}).'
  )


def _same_file(a: str, b: str) -> bool:
  return os.path.abspath(a) == os.path.abspath(b)


def _unknown_field_error(
    e: BaseException, argv: Sequence[str]
) -> Optional[str]:
  """'--config.optimizer.learnig_rate: config has no field learnig_rate
  (did you mean learning_rate?).', or None for another error."""
  missing = _missing_field(e)
  if missing is None:
    return None
  field, suggestion = missing
  overrides = [
      a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')
  ]
  named = [o for o in overrides if field in o.split('.')[1:]]
  flag = named[0] if named else f'--config.{field}'
  return f'{flag}: config has no field {field}{suggestion}.'


def _missing_field(e: BaseException) -> Optional[Tuple[str, str]]:
  """(field, ' (did you mean x?)' or '') of ml_collections' error for a
  field a ConfigDict lacks, or None for another error."""
  if not isinstance(e, (AttributeError, KeyError)):
    return None
  inner = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
  text = str(inner.args[0]) if inner.args else ''
  # The field quoted, then maybe "Did you mean".
  unknown = re.fullmatch(r"'([^']+)'", (text.splitlines() or [''])[0])
  if unknown:
    field = unknown.group(1)
  else:  # A field below one that holds a value, not a ConfigDict.
    lookup = re.search(r'Attempting to lookup: (\S+)', text)
    if not lookup:
      return None
    field = lookup.group(1)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return field, f' (did you mean {hint.group(1)}?)' if hint else ''


def _value_error(message: str, flag_values: flags.FlagValues) -> Optional[str]:
  """ "--config.batch_size must be a whole number; got 'abc'." for absl's
  "flag --config.batch_size=abc: invalid literal for int() ..."."""
  parsed = re.match(r'flag --(config\.[\w.]+)=(.*?): (.*)$', message, re.S)
  if not parsed:
    return None
  field, value, reason = parsed.groups()
  parser = flag_values[field].parser if field in flag_values else None
  for kind, words in _KINDS:
    if isinstance(parser, kind):
      return f'--{field} must be {words}; got {value!r}.'
  return f'--{field}={value}: {reason}'
