"""`python main.py` without its imports, for tests that start it many times.

A zygote is one Python process that imports what main.py needs (JAX,
Flax, Optax, Orbax, gaternet_jax, ...) and then forks one child per run.
A child does what `python main.py ARGS` does from the repository root:
it starts a session of its own (as `start_new_session=True`), its stdout
and stderr go to the given files, and it runs main.py as `__main__`, so
that absl parses its flags, the training code installs its SIGTERM handler
and the interpreter ends (atexit handlers, exit status) as main.py's would.
Only the seconds of imports are saved.

Forking a process that runs threads is unsafe, and JAX starts threads
with its backend: the zygote never initialises one (no device, no
computation; `jax._src.xla_bridge._backends` stays empty) and checks,
before each fork, that it runs no thread of its own beyond the one that
importing NumPy starts (OpenBLAS's pool, which handles fork itself).
What differs from a fresh interpreter: all children share the zygote's
hash seed (PYTHONHASHSEED), and a traceback starts with two frames of
this file. (Output and exit status of main.py's flag and config errors,
and of --helpshort, are byte for byte those of `python main.py`.)

  with Zygote(env) as zygote:
    child = zygote.start(['--workdir=...', ...], stderr=log_path)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -9
"""

import json
import os
import select
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What `python main.py --mode=train` imports, at its start and on its way
# (the training loop, the recipe's stages, the digits data).
PRELOAD = (
    'absl.app',
    'absl.flags',
    'absl.logging',
    'ml_collections.config_flags',
    'configs.base',
    'gaternet_jax.cli',
    'gaternet_jax.distributed',
    'gaternet_jax.flag_errors',
    'gaternet_jax.data',
    'gaternet_jax.fingerprint',
    'gaternet_jax.recipe',
    'gaternet_jax.train',
)


class Child:
  """A forked run: `pid` (its process group too), and Popen's `poll`,
  `wait` and `returncode` (minus the signal number when killed by one).

  The zygote reaps the child and reports its status; `poll` sees the exit
  itself (a pidfd turns readable when the process ends, reaped or not),
  as Popen's would, and then waits for that report: a run that ends just
  before a test's kill is not taken for one still running."""

  def __init__(self, zygote: 'Zygote', pid: int):
    self._zygote = zygote
    self.pid = pid
    self.returncode = None
    try:
      self._pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # Already ended (and reaped).
      self._pidfd = -1
    except (AttributeError, OSError):  # No pidfds here: reports alone.
      self._pidfd = None

  def _ended(self):
    if self._pidfd is None:
      return False
    return self._pidfd < 0 or bool(select.select([self._pidfd], [], [], 0)[0])

  def poll(self):
    if self.returncode is None:
      self._zygote._read_exit(self, timeout=None if self._ended() else 0)
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      self._zygote._read_exit(self, timeout=timeout)
    if self.returncode is None:
      raise subprocess.TimeoutExpired(['main.py'], timeout)
    return self.returncode

  def _close(self):
    if self._pidfd is not None and self._pidfd >= 0:
      os.close(self._pidfd)
    self._pidfd = None


class Zygote:
  """A process that imported `PRELOAD`, started with `env` (what a
  child's JAX reads from the environment at import, it read here), and
  forks one child at a time."""

  def __init__(self, env=None, preload=PRELOAD, timeout=300):
    self._err = tempfile.TemporaryFile()  # The zygote's own stderr.
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *preload],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=self._err,
    )
    self._buf = b''
    self._child = None
    ready = self._read_line(timeout)
    if ready != {'ready': True}:
      self.close()
      raise RuntimeError(f'zygote failed to start: {ready}')

  def __enter__(self):
    return self

  def __exit__(self, *_):
    self.close()

  def start(self, argv, stdout=os.devnull, stderr=os.devnull) -> Child:
    """Runs `python main.py *argv` in a child, with its stdout and stderr
    appended to the files of those paths."""
    assert self._child is None or self._child.returncode is not None
    self._send(dict(argv=list(argv), stdout=stdout, stderr=stderr))
    reply = self._read_line(timeout=60)
    if 'pid' not in reply:
      raise RuntimeError(f'zygote failed to fork: {reply}')
    self._child = Child(self, reply['pid'])
    return self._child

  def close(self):
    """Kills a child still running, and ends the zygote."""
    child, self._child = self._child, None
    if child is not None and child.returncode is None:
      try:
        os.killpg(child.pid, 9)
      except ProcessLookupError:
        pass
      child._close()  # pylint: disable=protected-access
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._proc.stdout.close()
    self._err.close()

  def _send(self, message):
    self._proc.stdin.write(json.dumps(message).encode() + b'\n')
    self._proc.stdin.flush()

  def _read_line(self, timeout):
    """The zygote's next message; None if none came within `timeout`
    seconds (None: no limit)."""
    deadline = None if timeout is None else time.time() + timeout
    fd = self._proc.stdout.fileno()
    while b'\n' not in self._buf:
      left = None if deadline is None else max(deadline - time.time(), 0)
      if not select.select([fd], [], [], left)[0]:
        return None
      chunk = os.read(fd, 65536)
      if not chunk:
        self._err.seek(0)
        err = self._err.read().decode(errors='replace')
        raise RuntimeError(f'zygote ended: {err[-3000:]}')
      self._buf += chunk
    line, self._buf = self._buf.split(b'\n', 1)
    return json.loads(line)

  def _read_exit(self, child, timeout):
    message = self._read_line(timeout)
    if message is not None:
      assert message['pid'] == child.pid, message
      child.returncode = message['returncode']
      child._close()  # pylint: disable=protected-access


# The zygote process.


def _threads():
  return len(os.listdir('/proc/self/task'))


_THREADS = []  # The most threads: after importing NumPy (OpenBLAS's pool).


def _preload(modules):
  """Imports `modules`; returns nothing, or why forking is unsafe."""
  import importlib  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  if not _THREADS:
    importlib.import_module('numpy')
    _THREADS.append(_threads())
  for name in modules:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  if xla_bridge._backends:  # pylint: disable=protected-access
    return 'a JAX backend was initialised'
  if threading.active_count() != 1 or _threads() > _THREADS[0]:
    return f'threads running: {threading.enumerate()}, {_threads()} in all'
  return None


def _serve(modules):
  """Answers commands on stdin until it closes; returns in each forked
  child, with its command."""
  reply = lambda m: os.write(1, json.dumps(m).encode() + b'\n')
  unsafe = _preload(modules)
  sys.stdout.flush()
  sys.stderr.flush()
  if unsafe:
    reply({'error': unsafe})
    sys.exit(1)
  reply({'ready': True})
  buf = b''
  while True:
    while b'\n' not in buf:
      chunk = os.read(0, 65536)
      if not chunk:
        sys.exit(0)
      buf += chunk
    line, buf = buf.split(b'\n', 1)
    command = json.loads(line)
    unsafe = _preload(())
    if unsafe:
      reply({'error': unsafe})
      sys.exit(1)
    synced_r, synced_w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(synced_r)
      os.setsid()
      os.close(synced_w)
      return command
    os.close(synced_w)
    os.read(synced_r, 1)  # The child's session is set up.
    os.close(synced_r)
    reply({'pid': pid})
    _, status = os.waitpid(pid, 0)
    reply({'pid': pid, 'returncode': os.waitstatus_to_exitcode(status)})


def _become_main(command):
  """This forked child turns into `python main.py *argv`."""
  flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
  null = os.open(os.devnull, os.O_RDONLY)
  out = os.open(command['stdout'], flags, 0o644)
  err = os.open(command['stderr'], flags, 0o644)
  for fd, target in ((null, 0), (out, 1), (err, 2)):
    os.dup2(fd, target)
    os.close(fd)
  main_py = os.path.join(REPO, 'main.py')
  sys.argv = ['main.py', *command['argv']]
  sys.path[0] = REPO
  # What the interpreter sets up for a script: an absolute __file__ (and
  # code file name), sys.argv[0] as given.
  import builtins  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  module = types.ModuleType('__main__')
  module.__file__ = main_py
  module.__cached__ = None
  module.__loader__ = importlib.machinery.SourceFileLoader('__main__', main_py)
  module.__builtins__ = builtins
  sys.modules['__main__'] = module
  with open(main_py, 'rb') as f:
    code = compile(f.read(), main_py, 'exec')
  exec(code, module.__dict__)  # pylint: disable=exec-used


if __name__ == '__main__':
  sys.path[0] = REPO  # As for main.py: the repository's packages first.
  _become_main(_serve(sys.argv[1:]))
