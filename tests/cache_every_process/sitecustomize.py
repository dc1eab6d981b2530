"""Every process of a multi-process job on CPUs writes JAX's compilation
cache, not process 0 alone.

On CPUs a program's cache key differs from process to process (it hashes
the process's view of the devices' topology), so the entries that process
0 writes are never found by the others, and each process but 0 compiled
every program of every run again. The tests that start such jobs put this
directory on their processes' PYTHONPATH: Python imports this module at
startup. Each process then writes its own entries (their keys differ, so
no two processes write one file).
"""

import inspect
import warnings

# The JAX function this wraps, and its parameters.
_PARAMETERS = (
    'cache_key',
    'compile_time_secs',
    'module_name',
    'backend',
    'executable',
    'host_callbacks',
)


def _install():
  try:
    # pylint: disable=g-import-not-at-top
    from jax._src import compilation_cache
    from jax._src import compiler
    from jax._src import config
    from jax._src import distributed
  except ImportError:
    return
  write = getattr(compiler, '_cache_write', None)
  if write is None or getattr(write, 'every_process', False):
    return
  if tuple(inspect.signature(write).parameters) != _PARAMETERS:
    return  # Another JAX: left as it is (process 0 alone writes).

  def cache_write(
      cache_key,
      compile_time_secs,
      module_name,
      backend,
      executable,
      host_callbacks,
  ):
    if (
        not distributed.global_state.process_id
        or host_callbacks
        or compile_time_secs
        < config.persistent_cache_min_compile_time_secs.value
    ):
      return write(
          cache_key,
          compile_time_secs,
          module_name,
          backend,
          executable,
          host_callbacks,
      )
    try:
      compilation_cache.put_executable_and_time(
          cache_key, module_name, executable, backend, int(compile_time_secs)
      )
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(
          f'Error writing a compilation cache entry: {e}', stacklevel=2
      )
    return None

  cache_write.every_process = True
  compiler._cache_write = cache_write  # pylint: disable=protected-access


_install()
