"""Metric writers and progress reporting.

Every run writes `metrics.jsonl` (one JSON object per write) in its workdir.
With TensorFlow and TensorBoard installed, clu's writers add TensorBoard
summaries and clu's ReportProgress logs steps/s and ETA; without them (GPU
hosts that have no TensorFlow) a plain logger does the same.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
import jax
import numpy as np

from gaternet_jax import paths


def _scalar(v) -> float:
  return float(np.asarray(v))


class JsonlWriter:
  """Writes `{"step": s, "kind": k, "time": t, **values}` lines to a file.

  The lines are kept in memory and the whole file is rewritten at
  `flush()`, atomically (`paths.write_text`: a temporary file and a rename;
  on Cloud Storage, which has no append, one object write), so neither a
  kill nor a full disk leaves half a line. The trainer flushes before every
  checkpoint (a resumed run finds every record up to its checkpoint), and
  a write flushes when the last flush is `flush_secs` old.

  A run resumed at step k first drops the records of steps after k
  (written after the checkpoint it resumes from, and about to be written
  again), so the file reads as that of an uninterrupted run. A line that is
  not a JSON record (a damaged file) is kept where it is, with a warning:
  records are only ever dropped for their step.
  """

  def __init__(
      self,
      path: str,
      resume_step: Optional[int] = None,
      flush_secs: Optional[float] = None,
  ):
    self._path = path
    self._lines: List[str] = []
    self._dirty = False
    self._flushed_at = time.time()
    if flush_secs is None:
      flush_secs = 60.0 if path and paths.is_remote(path) else 10.0
    self._every = flush_secs
    if not path or not paths.resolve(path).exists():
      return
    self._lines = paths.read_lines(path)
    if resume_step is not None:
      self._drop_records_after(resume_step)

  def _drop_records_after(self, step: int):
    kept, damaged = [], []
    for i, line in enumerate(self._lines):
      rec = _record(line)
      if rec is None:
        damaged.append(i + 1)
      elif rec['step'] > step:
        continue
      kept.append(line if line.endswith('\n') else line + '\n')
    if damaged:
      logging.warning(
          '%s: line(s) %s are not JSON records (a damaged file); kept as '
          'they are.',
          self._path,
          ', '.join(map(str, damaged[:10])) + (' ...' * (len(damaged) > 10)),
      )
    if len(kept) != len(self._lines):
      logging.info(
          'Dropped %d records after step %d from %s.',
          len(self._lines) - len(kept),
          step,
          self._path,
      )
      self._lines = kept
      self._dirty = True
      self.flush()

  def has_record(self, step: int, kind: str, key: str) -> bool:
    """Whether the file holds a `kind` record of `step` with `key`."""
    for line in self._lines:
      rec = _record(line)
      if rec and rec['step'] == step and rec.get('kind') == kind:
        if key in rec:
          return True
    return False

  def _write(self, kind: str, step: int, values: Mapping[str, Any]):
    if not self._path:
      return
    rec = {'step': int(step), 'kind': kind, 'time': time.time()}
    rec.update(values)
    self._lines.append(paths.dumps(rec) + '\n')
    self._dirty = True
    if time.time() - self._flushed_at >= self._every:
      self.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._write('scalars', step, {k: _scalar(v) for k, v in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write('texts', step, dict(texts))

  def flush(self):
    if self._path and self._dirty:
      paths.write_text(self._path, ''.join(self._lines))
      self._dirty = False
      self._flushed_at = time.time()

  def close(self):
    self.flush()
    self._path = None


def _record(line: str) -> Optional[Dict[str, Any]]:
  """The record of a metrics.jsonl line, or None if it is not one."""
  try:
    rec = json.loads(line)
  except ValueError:
    return None
  if not isinstance(rec, dict) or not isinstance(rec.get('step'), int):
    return None
  return rec


class LoggingWriter:
  """Logs scalars through absl, as clu's LoggingWriter does."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = ', '.join(
        f'{k}={_scalar(v):.6g}' for k, v in sorted(scalars.items())
    )
    logging.info('[%d] %s', step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for k, v in texts.items():
      logging.info('[%d] %s: %s', step, k, v)

  def has_record(self, step: int, kind: str, key: str) -> bool:
    del step, kind, key
    return False

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  """Forwards every call to each writer."""

  def __init__(self, writers: List[Any]):
    self._writers = writers

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_texts(self, step, texts):
    for w in self._writers:
      w.write_texts(step, texts)

  def has_record(self, step: int, kind: str, key: str) -> bool:
    """Whether a writer that reads its records back holds this one."""
    return any(
        w.has_record(step, kind, key)
        for w in self._writers
        if hasattr(w, 'has_record')
    )

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def tensorboard_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorboard  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def create_writer(
    workdir: str,
    use_tensorboard: bool = True,
    resume_step: Optional[int] = None,
) -> MultiWriter:
  """The run's writer: JSON lines always, TensorBoard when available.

  Only process 0 writes files; every process logs. `resume_step`: the step
  the run starts from (0 for a new one); metrics.jsonl loses the records
  after it, which this run writes again.
  """
  lead = jax.process_index() == 0
  writers: List[Any] = []
  if lead:
    writers.append(
        JsonlWriter(paths.join(workdir, 'metrics.jsonl'), resume_step)
    )
  if use_tensorboard and tensorboard_available():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    writers.append(
        metric_writers.create_default_writer(
            workdir, just_logging=not lead, asynchronous=False
        )
    )
  else:
    writers.append(LoggingWriter())
  return MultiWriter(writers)


class ProgressLogger:
  """Logs step, steps/s, images/s and ETA every `every_secs` seconds.

  Steps/s are those of the last interval; the ETA uses the mean rate since
  the first report (so compilation is left out, and the evals and
  checkpoints on the way are counted in). Steps are dispatched
  asynchronously, so `sync` (waiting for the last dispatched step) is called
  before each report: the rates are of finished steps, not of dispatched
  ones.
  """

  def __init__(
      self,
      num_train_steps: int,
      batch_size: int,
      writer: Optional[Any] = None,
      every_secs: float = 30.0,
      first_step: int = 0,
  ):
    self._total = num_train_steps
    self._batch = batch_size
    self._writer = writer
    self._every = every_secs
    self._last_t = time.time()
    self._last_step = first_step
    self._first = None  # (t, step) of the first report

  def __call__(
      self,
      step: int,
      t: Optional[float] = None,
      sync: Optional[Callable[[], Any]] = None,
  ) -> bool:
    t = time.time() if t is None else t
    if t - self._last_t < self._every and step != self._total:
      return False
    if sync is not None:
      sync()
      t = time.time()
    dt, ds = t - self._last_t, step - self._last_step
    if ds <= 0 or dt <= 0:
      return False
    rate = ds / dt
    if self._first is None:
      self._first = (t, step)
      mean_rate = rate
    else:
      t0, step0 = self._first
      mean_rate = (step - step0) / (t - t0)
    eta = (self._total - step) / mean_rate
    logging.info(
        'step %d/%d (%.1f%%): %.2f steps/s, %.0f images/s, ETA %s',
        step,
        self._total,
        100.0 * step / max(self._total, 1),
        rate,
        rate * self._batch,
        format_seconds(eta),
    )
    if self._writer is not None:
      self._writer.write_scalars(
          step, {'steps_per_sec': rate, 'images_per_sec': rate * self._batch}
      )
    self._last_t, self._last_step = t, step
    return True


def format_seconds(s: float) -> str:
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f'{h}h{m:02d}m{sec:02d}s' if h else f'{m}m{sec:02d}s'


def average(metrics: List[Dict[str, Any]]) -> Dict[str, float]:
  """Per-step mean of a list of metric dicts (fetched in one transfer);
  each value a scalar (one step) or a `(steps,)` array (scanned steps)."""
  if not metrics:
    return {}
  fetched = jax.device_get(metrics)
  return {
      k: float(np.mean(np.concatenate([np.atleast_1d(m[k]) for m in fetched])))
      for k in fetched[0]
  }


class TrainWindow:
  """The train metrics of the steps since the last log.

  `add(first_step, metrics)` after each call of the train step(s) (each
  value a scalar, or `(n,)` for n scanned steps); `first_nonfinite()` says
  whether one of those steps left non-finite values (`nonfinite_key`'s
  code, fetched only where the host syncs anyway: before a log, an eval or
  a checkpoint); `pop()` returns their per-step means and empties the
  window. A checkpoint between two logs carries the window in its
  metadata (`to_json`, `from_json`), so that the run resumed from it logs
  the same means as one never stopped.
  """

  def __init__(self, nonfinite_key: str):
    self._key = nonfinite_key
    self._entries: List[Tuple[int, Dict[str, Any]]] = []
    self._checked = 0  # entries whose codes were fetched, all 0

  def __bool__(self) -> bool:
    return bool(self._entries)

  def add(self, first_step: int, metrics: Dict[str, Any]):
    self._entries.append((first_step, metrics))

  def first_nonfinite(self) -> Optional[Tuple[int, int]]:
    """`(step, code)` of the first step whose code is not 0, or None."""
    new = self._entries[self._checked :]
    codes = jax.device_get([m.get(self._key, 0) for _, m in new])
    for (first, _), c in zip(new, codes):
      c = np.atleast_1d(c)
      bad = np.flatnonzero(c)
      if bad.size:
        return first + int(bad[0]), int(c[bad[0]])
    self._checked = len(self._entries)
    return None

  def pop(self) -> Dict[str, float]:
    values = [
        {k: v for k, v in m.items() if k != self._key} for _, m in self._entries
    ]
    self._entries, self._checked = [], 0
    return average(values)

  def to_json(self) -> Optional[Dict[str, Any]]:
    """The window as JSON: `{'first_step', 'values': {k: [...]},
    'dtypes': {k: name}}` (exact: each float32 is a float64, which JSON
    keeps), or None when empty."""
    if not self._entries:
      return None
    fetched = jax.device_get([m for _, m in self._entries])
    keys = [k for k in fetched[0] if k != self._key]
    stacked = {
        k: np.concatenate([np.atleast_1d(m[k]) for m in fetched]) for k in keys
    }
    return {
        'first_step': self._entries[0][0],
        'values': {k: [float(x) for x in v] for k, v in stacked.items()},
        'dtypes': {k: str(v.dtype) for k, v in stacked.items()},
    }

  @classmethod
  def from_json(
      cls, nonfinite_key: str, saved: Optional[Dict[str, Any]]
  ) -> 'TrainWindow':
    window = cls(nonfinite_key)
    if saved:
      window.add(
          int(saved['first_step']),
          {
              k: np.asarray(v, np.float64).astype(
                  jax.numpy.dtype(saved['dtypes'][k])
              )
              for k, v in saved['values'].items()
          },
      )
      window._checked = 1
    return window


def create_progress(
    num_train_steps: int,
    batch_size: int,
    writer: Any,
    every_secs: float,
    first_step: int = 0,
    use_tensorboard: bool = True,
):
  """clu's ReportProgress (steps/s and ETA) when the run writes TensorBoard
  summaries and clu imports; else ours.

  Both are called as `progress(step, sync=...)` after each step.
  """
  if use_tensorboard and tensorboard_available():
    try:
      from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    except ImportError:
      pass
    else:
      report = periodic_actions.ReportProgress(
          num_train_steps=num_train_steps, writer=writer, every_secs=every_secs
      )
      ours = ProgressLogger(
          num_train_steps, batch_size, None, every_secs, first_step
      )

      def both(step, t=None, sync=None):
        reported = ours(step, t, sync)  # first: it syncs before reporting
        report(step, t=t)
        return reported

      return both
  return ProgressLogger(
      num_train_steps, batch_size, writer, every_secs, first_step
  )
