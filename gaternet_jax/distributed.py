"""Several processes as one job: JAX's distributed runtime, and errors.

`initialize` starts JAX's distributed runtime when the job has more than
one process, before any other JAX call: with no arguments where JAX detects
the cluster itself (Cloud TPU VM pod slices, Slurm, Open MPI, ...), or from
an explicit coordinator address, process count and process id (flags or
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`). A
single-process run never waits for a coordinator.

An error on one process must stop the others, which would otherwise wait in
the next collective until a timeout. `fail` publishes the error's sentence
in the runtime's key-value store before the process exits; every other
process watches that key (`watch_for_errors`), prints the same sentence and
exits too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

from absl import logging
import jax

from gaternet_jax.errors import ConfigError

ERROR_KEY = 'gaternet_jax/error'
ACK_KEY = 'gaternet_jax/error_ack/'
DONE_KEY = 'gaternet_jax/error_done'
ENV_VARS = {
    'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
    'num_processes': 'JAX_NUM_PROCESSES',
    'process_id': 'JAX_PROCESS_ID',
}
# How often the other processes look for a published error, and how long
# the failing one waits for them to have read it before it exits.
POLL_SECS = 0.5
ACK_TIMEOUT_SECS = 10.0

_state = {'initialized': False, 'watcher': None, 'stop': None}


def _from_env(name: str, value):
  """The flag's value, else its environment variable's (None if neither)."""
  if value is not None:
    return value
  raw = os.environ.get(ENV_VARS[name], '').strip()
  if not raw:
    return None
  if name == 'coordinator_address':
    return raw
  try:
    return int(raw)
  except ValueError:
    raise ConfigError(
        f'{ENV_VARS[name]}={raw!r} must be a whole number.'
    ) from None


def _detected_cluster():
  """The multi-process environment JAX detects by itself, or None.

  Reads JAX's cluster registry (Cloud TPU VM, Slurm, Open MPI, ...) the way
  `jax.distributed.initialize()` does with no arguments; only the
  environments that are not opt-in are tried.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top

  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if getattr(env, 'opt_in_only_method', False):
      continue
    try:
      if env.is_env_present():
        return env
    except Exception:  # pylint: disable=broad-except
      continue  # A probe that cannot run here means: not that cluster.
  return None


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    heartbeat_timeout_seconds: int = 100,
) -> bool:
  """Starts JAX's distributed runtime if the job has several processes.

  Returns whether it did. Call it before any other JAX call.

  Raises:
    ConfigError: for an incomplete or inconsistent explicit setting.
  """
  address = _from_env('coordinator_address', coordinator_address)
  count = _from_env('num_processes', num_processes)
  index = _from_env('process_id', process_id)
  if address is not None or count is not None or index is not None:
    if count is not None and count < 1:
      raise ConfigError(f'--num_processes must be >= 1; got {count}.')
    if count == 1 and index in (None, 0):
      return False  # One process: nothing to coordinate.
    missing = [
        f'--{k} (or {ENV_VARS[k]})'
        for k, v in (
            ('coordinator_address', address),
            ('num_processes', count),
            ('process_id', index),
        )
        if v is None
    ]
    if missing:
      raise ConfigError(
          f'A multi-process run needs --coordinator_address, '
          f'--num_processes and --process_id together; '
          f'{", ".join(missing)} not set.'
      )
    if not 0 <= index < count:
      raise ConfigError(
          f'--process_id must be in [0, {count - 1}] for '
          f'--num_processes={count}; got {index}.'
      )
    logging.info('Process %d of %d, coordinator %s.', index, count, address)
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=count,
        process_id=index,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
    )
  else:
    env = _detected_cluster()
    if env is None or env.get_process_count() <= 1:
      return False
    logging.info(
        '%s detected: starting %d processes.',
        env.__name__,
        env.get_process_count(),
    )
    jax.distributed.initialize(
        heartbeat_timeout_seconds=heartbeat_timeout_seconds
    )
  _state['initialized'] = True
  watch_for_errors()
  return True


def _client():
  """JAX's distributed runtime client (None in a single-process run).

  JAX has no public key-value API; Orbax reads the same private handle.
  """
  if not _state['initialized']:
    return None
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top

  return jax_distributed.global_state.client


def _try_get(client, key: str) -> Optional[str]:
  """The value at `key`, or None while it is unset (or unreachable)."""
  try:
    return client.key_value_try_get(key)
  except Exception:  # pylint: disable=broad-except
    return None  # NOT_FOUND, or the service is going away.


def _print(message: str):
  logging.flush()
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)


def _exit(message: Optional[str], code: int):
  if message is not None:
    _print(message)
  # Skip interpreter shutdown: JAX's shutdown barrier would wait for the
  # processes this error stops.
  os._exit(code)  # pylint: disable=protected-access


def _watch(client, stop: threading.Event):
  me = jax.process_index()
  while not stop.wait(POLL_SECS):
    raw = _try_get(client, ERROR_KEY)
    if raw is None:
      continue
    origin, _, message = raw.partition('\t')
    try:
      client.key_value_set(f'{ACK_KEY}{me}', '1')
    except Exception:  # pylint: disable=broad-except
      pass
    if me == 0:
      # Process 0 hosts the runtime's service: it leaves last, or the
      # others' runtime clients abort the moment it is gone.
      _wait_for(lambda: _try_get(client, DONE_KEY) is not None)
    _exit(
        f'{message} (raised on process {origin} of '
        f'{jax.process_count()}; process {me} stopped too)',
        1,
    )


def _wait_for(predicate, timeout: float = ACK_TIMEOUT_SECS):
  deadline = time.time() + timeout
  while not predicate() and time.time() < deadline:
    time.sleep(POLL_SECS / 5)


def watch_for_errors():
  """Starts the thread that stops this process when another one fails."""
  client = _client()
  if client is None or _state['watcher'] is not None:
    return
  stop = threading.Event()
  thread = threading.Thread(
      target=_watch,
      args=(client, stop),
      daemon=True,
      name='gaternet_jax-error-watch',
  )
  thread.start()
  _state.update(watcher=thread, stop=stop)


def fail(message: str, code: int = 1):
  """Prints `message` and exits; in a multi-process job, stops them all.

  The message is published for the other processes, which print it and
  exit; this one waits (at most ACK_TIMEOUT_SECS) until each has read it.
  """
  client = _client()
  if client is None:
    logging.flush()
    sys.exit(message)  # Prints it to stderr, exit status 1.
  if _state['stop'] is not None:
    _state['stop'].set()  # This process is the one that reports.
  me, count = jax.process_index(), jax.process_count()
  try:
    client.key_value_set(ERROR_KEY, f'{me}\t{message}')
  except Exception:  # pylint: disable=broad-except
    pass  # Another process published first: its watcher may stop us.
  _print(message)
  _wait_for(
      lambda: all(
          _try_get(client, f'{ACK_KEY}{p}') is not None
          for p in range(count)
          if p != me
      )
  )
  try:
    client.key_value_set(DONE_KEY, '1')
  except Exception:  # pylint: disable=broad-except
    pass
  if me == 0:
    time.sleep(POLL_SECS)  # The others are on their way out.
  _exit(None, code)


def is_multiprocess() -> bool:
  """Whether `initialize` joined this process to a multi-process job."""
  return _state['initialized']
