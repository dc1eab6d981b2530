"""Metric writers and progress reporting.

Every run writes `metrics.jsonl` (one JSON object per write) in its workdir.
With TensorFlow and TensorBoard installed, clu's writers add TensorBoard
summaries and clu's ReportProgress logs steps/s and ETA; without them (GPU
hosts that have no TensorFlow) a plain logger does the same.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from absl import logging
import jax
import numpy as np

from gaternet_jax import paths


def _scalar(v) -> float:
  return float(np.asarray(v))


class JsonlWriter:
  """Appends `{"step": s, "kind": k, **values}` lines to a file.

  A run resumed at step k first drops the records of steps after k (written
  after the checkpoint it resumes from, and about to be written again), so
  the file reads as that of an uninterrupted run.

  Cloud Storage objects cannot be appended to: on a gs:// path the file's
  lines are kept in memory and the whole object is rewritten at `flush()`
  (the trainer flushes with every checkpoint, so a resumed run finds every
  record up to its checkpoint) and at most every `remote_flush_secs`.
  """

  def __init__(
      self,
      path: str,
      resume_step: Optional[int] = None,
      remote_flush_secs: float = 60.0,
  ):
    self._path = path
    self._remote = bool(path) and paths.is_remote(path)
    self._lines: List[str] = []
    self._dirty = False
    self._flushed_at = time.time()
    self._every = remote_flush_secs
    self._file = None
    if not path:
      return
    exists = paths.resolve(path).exists()
    if exists and resume_step is not None:
      _drop_records_after(path, resume_step)
    if self._remote:
      if exists:
        self._lines = (
            paths.resolve(path)
            .read_text(encoding='utf-8')
            .splitlines(keepends=True)
        )
    else:
      self._file = open(path, 'a', encoding='utf-8')

  def _write(self, kind: str, step: int, values: Mapping[str, Any]):
    if not self._path:
      return
    rec = {'step': int(step), 'kind': kind, 'time': time.time()}
    rec.update(values)
    line = json.dumps(rec) + '\n'
    if self._remote:
      self._lines.append(line)
      self._dirty = True
      if time.time() - self._flushed_at >= self._every:
        self.flush()
      return
    self._file.write(line)
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._write('scalars', step, {k: _scalar(v) for k, v in scalars.items()})

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write('texts', step, dict(texts))

  def flush(self):
    if self._file is not None:
      self._file.flush()
    if self._remote and self._dirty:
      paths.write_text(self._path, ''.join(self._lines))
      self._dirty = False
      self._flushed_at = time.time()

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
    self._path = None


def _drop_records_after(path: str, step: int):
  """Rewrites `path` (atomically) without the records of steps > `step`."""
  lines = (
      paths.resolve(path).read_text(encoding='utf-8').splitlines(keepends=True)
  )
  kept = []
  for line in lines:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # A line cut short by the crash.
      continue
    if int(rec.get('step', 0)) <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) == len(lines):
    return
  logging.info(
      'Dropped %d records after step %d from %s.',
      len(lines) - len(kept),
      step,
      path,
  )
  paths.write_text(path, ''.join(kept))


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


def create_progress(
    num_train_steps: int,
    batch_size: int,
    writer: Any,
    every_secs: float,
    first_step: int = 0,
):
  """clu's ReportProgress (steps/s and ETA) when clu imports; else ours.

  Both are called as `progress(step, sync=...)` after each step.
  """
  if tensorboard_available():
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
