"""One path layer for workdirs and data dirs: local folders and gs:// alike.

Every file a run reads or writes goes through etils' `epath` (which Orbax
uses too): a local path is made absolute, a URI (`gs://bucket/run`) is kept
as it is, never turned into a local folder named `gs:`. Cloud Storage has
no rename and no append, so the helpers here write whole objects (each
write of one object is atomic there) and write local files through a
temporary file and a rename (atomic on a POSIX filesystem).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Union

from etils import epath

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
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(path: PathLike, text: str):
  write_bytes(path, text.encode('utf-8'))


def write_json(path: PathLike, obj: Any):
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: PathLike) -> Any:
  return json.loads(resolve(path).read_text(encoding='utf-8'))


def save_figure(fig, path: PathLike, dpi: int) -> str:
  """Saves a matplotlib figure as PNG at `path`; returns the path."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  write_bytes(path, buf.getvalue())
  return os.fspath(resolve(path))
