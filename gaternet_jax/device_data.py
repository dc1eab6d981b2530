"""A training set held on the accelerators, batched inside the jitted step.

For datasets that fit in device memory (CIFAR: 150 MB of uint8), keeping
them on the devices and drawing each batch inside `jit` removes the host
from the loop, so several steps can run per host round-trip (`lax.scan`).
The example order is a function of (seed, epoch), as on the host path, so a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax import sharding


def put_on_devices(arrays: Dict[str, np.ndarray], mesh) -> Dict[str, jax.Array]:
  """The train split `arrays` (a dataset's `train_arrays()`: 'image' (N, h,
  w, c) uint8, 'label' (N,)), replicated on every device of `mesh`."""
  return sharding.replicate(
      {'image': arrays['image'], 'label': arrays['label'].astype('int32')}, mesh
  )


def batch_at(
    arrays: Dict[str, jax.Array],
    step: jax.Array,
    *,
    batch_size: int,
    seed: int,
    mesh,
) -> Dict[str, jax.Array]:
  """Global batch `step` (drop-remainder epochs, reshuffled each epoch),
  split over the mesh's data axis. Traceable: call inside jit."""
  n = arrays['label'].shape[0]
  steps_per_epoch = n // batch_size
  epoch, i = step // steps_per_epoch, step % steps_per_epoch
  perm = jax.random.permutation(
      jax.random.fold_in(jax.random.key(seed), epoch), n
  )
  idx = jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))
  data = sharding.batch_sharded(mesh)
  return {
      k: jax.lax.with_sharding_constraint(jnp.take(v, idx, axis=0), data)
      for k, v in arrays.items()
  }
