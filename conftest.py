"""Makes the repository root importable (configs/, tests/) for pytest."""

import os
import tempfile

import jax

# Many tests compile the same small steps; a persistent cache shared by the
# test process and its subprocesses compiles each program once.
_CACHE = os.path.join(tempfile.gettempdir(), 'gaternet_jax_test_xla_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
jax.config.update(
    'jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR']
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
