"""Host-side batching of an in-memory dataset, deterministic by step.

The order of training examples is a function of (seed, epoch) alone, so a
run resumed at step k sees exactly the batches an uninterrupted run sees.
Every process computes the same global batch indices and takes its own rows
of them.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

from gaternet_jax import sharding
from gaternet_jax.errors import ConfigError


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full global batches of `batch_size` in `num_examples` (the last
  partial one is dropped); a ConfigError if there is not one."""
  steps = num_examples // batch_size if batch_size > 0 else 0
  if steps < 1:
    raise ConfigError(
        f'batch_size={batch_size} exceeds the {num_examples} '
        'training examples.'
    )
  return steps


def train_indices(
    num_examples: int, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[np.ndarray]:
  """This process's example indices of global batch `start_step`, then
  onwards: epochs drop their last partial batch and are reshuffled by
  (seed, epoch)."""
  steps = steps_per_epoch(num_examples, batch_size)
  rows = sharding.process_slice(batch_size)
  step = start_step
  epoch, perm = -1, np.arange(0)  # The first step draws epoch 0's.
  while True:
    if step // steps != epoch:
      epoch = step // steps
      perm = epoch_permutation(num_examples, seed, epoch)
    i = step % steps
    yield perm[i * batch_size : (i + 1) * batch_size][rows]
    step += 1


def eval_indices(
    num_examples: int, batch_size: int
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(this process's indices, its rows of the mask) of each padded global
  batch over the whole split, in order; padding repeats the last example
  with mask 0."""
  rows = sharding.process_slice(batch_size)
  for start in range(0, num_examples, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = (idx < num_examples).astype(np.float32)
    yield np.minimum(idx, num_examples - 1)[rows], mask[rows]


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[Dict[str, np.ndarray]]:
  """Yields this process's rows of global batch `start_step`, then onwards
  (`train_indices`)."""
  for idx in train_indices(len(images), batch_size, seed, start_step):
    yield {'image': images[idx], 'label': labels[idx].astype(np.int32)}


def eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Iterator[Dict[str, np.ndarray]]:
  """Yields the whole split in order, the last batch padded, with a mask."""
  for idx, mask in eval_indices(len(images), batch_size):
    yield {
        'image': images[idx],
        'label': labels[idx].astype(np.int32),
        'mask': mask,
    }


def num_eval_batches(n: int, batch_size: int) -> int:
  return -(-n // batch_size)
