"""The dataset interface: what train, eval, analyze and benchmark read.

Every source implements `Dataset`: `data.InMemoryDataset` (digits, CIFAR,
held as host arrays), `data.FakeDataset` (synthetic batches) and
`input_pipeline.TfdataDataset` (ImageNet-style, streamed through tf.data).
`data.load_dataset(config.data)` returns the one a config names.

Batches are dicts of host numpy arrays holding this process's rows of a
global batch (`batch_size // jax.process_count()` of them):
  train: {'image': (rows, h, w, c) uint8, 'label': (rows,) int32};
  eval:  the same plus 'mask': (rows,) float32, 0 on padding rows.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Protocol, Tuple, runtime_checkable

import numpy as np

from gaternet_jax import augment

Batch = Dict[str, np.ndarray]


@runtime_checkable
class Dataset(Protocol):
  """A train split and an eval split of labelled images.

  Attributes:
    name: `data.name` of the config it was loaded from.
    num_classes: number of classes; labels are in [0, num_classes).
    mean, std: per-channel normalisation in [0, 1] units (one value per
      channel), applied in the jitted steps.
    test_split_name: the eval split's name in metrics ('test', 'validation',
      'val', ...).
  """
  name: str
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  test_split_name: str

  @property
  def image_shape(self) -> Tuple[int, ...]:
    """`(height, width, channels)` of every image."""

  @property
  def num_train_examples(self) -> int:
    """Examples in the train split (over all processes)."""

  @property
  def num_test_examples(self) -> int:
    """Examples in the eval split (over all processes)."""

  @property
  def augmentation(self) -> augment.Augmentation:
    """The augmentation the train step applies to this dataset's batches:
    the config's pad-crop and flip for in-memory data, none where the
    dataset augments its batches itself (tf.data)."""

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches of `batch_size` per epoch, the same on every
    process; raises ConfigError if there is not one."""

  def train_batches(self, batch_size: int, seed: int,
                    start_step: int = 0) -> Iterator[Batch]:
    """This process's rows of global train batches `start_step`, ...

    The stream is a function of (seed, start_step, the processes): a run
    resumed at step k sees the batches an uninterrupted run sees at k,
    k + 1, ...
    """

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """The eval split once, in padded global batches with a 'mask'; over
    all processes every example appears once with mask 1."""

  def train_arrays(self) -> Optional[Batch]:
    """The whole train split held in host memory, or None.

    The on-device capability: {'image': (N, h, w, c) uint8, 'label': (N,)
    int32} where the dataset holds them (data.on_device puts them on the
    accelerators; analysis.split='train' reads them), None where it
    streams or synthesises its batches.
    """
