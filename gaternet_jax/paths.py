"""One path layer for workdirs and data dirs: local folders and gs:// alike.

Every file a run reads or writes goes through etils' `epath` (which Orbax
uses too): a local path is made absolute, a URI (`gs://bucket/run`) is kept
as it is, never turned into a local folder named `gs:`. Cloud Storage has
no rename and no append, so the helpers here write whole objects (each
write of one object is atomic there) and write local files through a
temporary file and a rename (atomic on a POSIX filesystem).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import socket
from typing import Any, Optional, Union

from etils import epath

from gaternet_jax.errors import WorkdirError

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URI such as gs://bucket/dir (not a local path)."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """`path` as an epath.Path: absolute if local, unchanged if a URI."""
  if is_remote(path):
    return epath.Path(os.fspath(path).rstrip('/'))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(path: PathLike, *parts: str) -> str:
  """`path`/`parts...` as a string (a URI stays a URI)."""
  return os.fspath(resolve(path).joinpath(*parts))


def write_bytes(path: PathLike, data: bytes):
  """Writes `data` to `path` so that a reader never sees half a file."""
  target = resolve(path)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(target.name + '.tmp')
  try:
    tmp.write_bytes(data)
    os.replace(tmp, target)
  except BaseException:
    # A full disk or a kill: the target keeps its old contents, and no
    # half-written temporary file stays behind.
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise


def write_text(path: PathLike, text: str):
  # surrogateescape: lines read back from a damaged file keep their bytes.
  write_bytes(path, text.encode('utf-8', 'surrogateescape'))


def jsonable(obj: Any) -> Any:
  """`obj` with every NaN or infinite float replaced by None, so that its
  JSON is valid JSON (which has no NaN)."""
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  return obj


def dumps(obj: Any, **kwargs) -> str:
  """`json.dumps` of `jsonable(obj)`: never a bare NaN or Infinity."""
  return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def write_json(path: PathLike, obj: Any):
  write_text(path, dumps(obj, indent=2, sort_keys=True))


def read_json(path: PathLike, what: str = 'file') -> Any:
  """The JSON object in `path`; a WorkdirError (one sentence) if it is not
  valid JSON (a damaged or truncated `what`)."""
  raw = resolve(path).read_bytes()
  try:
    return json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    reason = e.reason if isinstance(e, UnicodeDecodeError) else e.msg
    raise WorkdirError(
        f'The {what} {os.fspath(resolve(path))} is damaged (not valid JSON: '
        f'{reason}); restore it or move it away.'
    ) from e


def read_lines(path: PathLike) -> list:
  """The lines of a text file, each with its newline; bytes that are not
  UTF-8 are kept (surrogateescape) so that rewriting the file keeps them."""
  return (
      resolve(path)
      .read_bytes()
      .decode('utf-8', 'surrogateescape')
      .splitlines(keepends=True)
  )


def save_figure(fig, path: PathLike, dpi: int) -> str:
  """Saves a matplotlib figure as PNG at `path`; returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  write_bytes(path, buf.getvalue())
  return os.fspath(resolve(path))


# What an OSError of a workdir's file says about the disk, not the code.
_DISK_ERRORS = (
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EISDIR,
)


def disk_error(e: BaseException) -> Optional[str]:
  """One sentence for an OSError that a full, read-only or forbidden path
  caused (None for other errors)."""
  if isinstance(e, OSError):
    code, filename, strerror = e.errno, e.filename, e.strerror
  else:  # Orbax's tensorstore errors carry the errno in their text.
    found = re.search(r"os_error_code='(\d+)'", str(e))
    if not found:
      return None
    code, filename = int(found.group(1)), None
    strerror = os.strerror(code)
  if code not in _DISK_ERRORS:
    return None
  where = f' {filename}' if filename else ''
  return (
      f'Cannot write{where} ({strerror}); free some space or choose a '
      f'--workdir this user can write, then run the same command again.'
  )


def check_writable(directory: PathLike):
  """Creates `directory` (and its parents) and writes and removes a file in
  it; a WorkdirError before any work if it is a file or that fails.

  The file is this process's own: the processes of a job check one
  workdir at the same moment, and one's removal must not find another's
  file gone."""
  path = resolve(directory)
  if path.exists() and not path.is_dir():
    raise WorkdirError(
        f'--workdir {os.fspath(directory)} is a file, not a directory; '
        f'choose another --workdir.'
    )
  probe = path / f'.write_check.{socket.gethostname()}.{os.getpid()}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b'')
    probe.unlink()
  except OSError as e:
    sentence = disk_error(e)
    if sentence is None:
      raise
    raise WorkdirError(sentence) from e
