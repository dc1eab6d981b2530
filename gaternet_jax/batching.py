"""Host-side batching of an in-memory dataset, deterministic by step.

The order of training examples is a function of (seed, epoch) alone, so a
run resumed at step k sees exactly the batches an uninterrupted run sees.
Every process computes the same global batch indices and takes its own rows
of them.
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np

from gaternet_jax import sharding


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[Dict[str, np.ndarray]]:
  """Yields this process's rows of global batch `start_step`, then onwards.

  Epochs drop their last partial batch; examples are reshuffled each epoch.
  """
  n = len(images)
  steps_per_epoch = n // batch_size
  assert steps_per_epoch > 0, (n, batch_size)
  rows = sharding.process_slice(batch_size)
  step = start_step
  epoch, perm = -1, np.arange(0)  # The first step draws epoch 0's.
  while True:
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      perm = epoch_permutation(n, seed, epoch)
    i = step % steps_per_epoch
    idx = perm[i * batch_size : (i + 1) * batch_size][rows]
    yield {'image': images[idx], 'label': labels[idx].astype(np.int32)}
    step += 1


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[Dict[str, np.ndarray]]:
  """Yields the whole split in order, the last batch padded, with a mask."""
  n = len(images)
  rows = sharding.process_slice(batch_size)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = (idx < n).astype(np.float32)
    idx = np.minimum(idx, n - 1)[rows]
    yield {
        'image': images[idx],
        'label': labels[idx].astype(np.int32),
        'mask': mask[rows],
    }


def num_eval_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)
