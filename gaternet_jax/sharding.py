"""Data-parallel sharding over a device mesh (jit + NamedSharding).

Parameters are replicated, the batch is split over the mesh's 'data' axis.
Each process feeds its own slice of the global batch; the arrays are
assembled with `jax.make_array_from_process_local_data`, so the same code
runs on one CPU, one GPU, a TPU VM or many hosts.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gaternet_jax.errors import ConfigError

DATA_AXIS = 'data'


def create_mesh() -> Mesh:
  """A 1-D mesh of all devices along the data axis."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of `tree` (numpy, or jax.Arrays on any devices) as a
  jax.Array replicated over `mesh`.

  `jax.device_put` cannot move an array that lives on this process's
  devices onto a mesh spanning several processes; such leaves go through
  the host (each process holds the same value). PRNG keys keep their type.
  """
  repl = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(repl, x.ndim):
        return x
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        return jax.jit(
            lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=repl
        )(np.asarray(jax.random.key_data(x)))
    return jax.device_put(np.asarray(x), repl)

  return jax.tree_util.tree_map(put, tree)


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, what: str = 'batch_size') -> int:
  """Returns the per-process batch; a user error if it does not divide."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch % devices:
    raise ConfigError(
        f'{what}={global_batch} must be divisible by the number '
        f'of devices ({devices}).'
    )
  return global_batch // processes


def process_slice(global_batch: int) -> slice:
  """This process's rows of a global batch."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def to_global(batch: Any, sharding: NamedSharding) -> Any:
  """Per-process numpy arrays -> global jax.Arrays sharded on the batch."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )
