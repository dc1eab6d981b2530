"""The dataset interface: what train, eval, analyze and benchmark read.

Every source implements `Dataset`: `data.InMemoryDataset` (digits, CIFAR,
held as host arrays), `data.FakeDataset` (synthetic batches) and
`input_pipeline.TfdataDataset` (ImageNet-style, streamed through tf.data).
`data.load_dataset(config.data)` returns the one a config names.

Batches are dicts of host numpy arrays holding this process's rows of a
global batch (`batch_size // jax.process_count()` of them):
  train: {'image': (rows, h, w, c) uint8, 'label': (rows,) int32};
  eval:  the same plus 'mask': (rows,) float32, 0 on padding rows.
Segmentation datasets ('shapes', 'cityscapes') give per-pixel labels
instead: 'label' (rows, h, w) int32, each a class id or `ignore_label`.
"""

from __future__ import annotations

from typing import (
    Any,
    Dict,
    Iterator,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    runtime_checkable,
)

import ml_collections
import numpy as np

from gaternet_jax import augment
from gaternet_jax.errors import ConfigError

Batch = Dict[str, np.ndarray]

# The `config.data` schema: every field a loader reads, with the value a
# config that leaves it out gets. configs/base.py starts from these and sets
# its CIFAR values; the loaders complete partial configs with them
# (`data_config`), so each default lives here alone.
DATA_DEFAULTS: Dict[str, Any] = dict(
    # 'digits' | 'cifar10' | 'cifar100' (in memory), 'imagenet2012' (TFDS) |
    # 'image_folder' (streamed through tf.data), or 'fake' (random images).
    name=None,
    source=None,  # CIFAR: 'folder' | 'python_archive' | 'tfds'
    data_dir=None,  # the source's folder; TFDS: None or '' is its default
    validation_holdout=0,  # train examples held out as the eval split
    holdout_seed=0,  # the seed choosing the held-out examples
    num_train_examples=0,  # 0 or None: all (fake data: 1,281,167)
    num_test_examples=0,  # 0 or None: all (fake data: 50,000)
    # Per-channel normalisation in [0, 1] units; None computes it from train
    # (in-memory datasets) or takes ImageNet's (streamed ones).
    mean=None,  # one value per channel, or None
    std=None,  # one value per channel, or None
    crop_padding=0,  # in-memory train step: zero-pad and random crop back
    flip=False,  # in-memory train step: random horizontal flips
    on_device=False,  # keep the train split on the accelerators
    image_size=224,  # streamed and fake datasets: square side in pixels
    num_classes=1000,  # image folders and fake data: number of classes
    tfds_name='imagenet2012',  # the TFDS dataset name='imagenet2012' reads
    train_split='train',  # streamed datasets' train split
    # '' or None: TFDS 'validation'; image folders 'val', 'validation', 'test'.
    eval_split='',
    cache=False,  # cache decoded records in memory (input_pipeline.py)
    shuffle_buffer=10_000,  # encoded TFDS records (folders: all files)
    prefetch=None,  # batches; None: tf.data.AUTOTUNE
    num_parallel_calls=None,  # decoding threads; None: AUTOTUNE
    crop_area_range=(0.08, 1.0),  # Inception-style train crop: area fraction
    aspect_ratio_range=(3 / 4, 4 / 3),  # ... and width / height
    eval_crop_fraction=0.875,  # eval: resize to image_size / this, crop
    resize_method='bilinear',  # a tf.image.resize method
    antialias=True,  # low-pass when downscaling, as PIL does
    # Semantic segmentation ('shapes', 'cityscapes'): labels are per-pixel
    # masks, `image_size` may be an int or (height, width), and the train
    # step rescales, crops and flips image and mask together (augment.py
    # SegmentationAugmentation).
    ignore_label=255,  # mask value the loss and the metrics skip
    scale_range=(1.0, 1.0),  # train: random rescale factor, low to high
    crop_size=None,  # train: crop side or (height, width); None: image size
)


def data_config(
    data_cfg: Optional[Mapping[str, Any]] = None,
) -> ml_collections.ConfigDict:
  """The complete data config: DATA_DEFAULTS overridden by `data_cfg`.

  Args:
    data_cfg: a ConfigDict or mapping of some `config.data` fields, or None.

  Returns:
    A new ConfigDict holding every field of DATA_DEFAULTS, with `data_cfg`'s
    values where it sets them (the given config is left as it is).

  Raises:
    ConfigError: `data_cfg` has a field DATA_DEFAULTS lacks (a typo).
  """
  fields = dict(data_cfg.items()) if data_cfg is not None else {}
  unknown = sorted(set(fields) - set(DATA_DEFAULTS))
  if unknown:
    names = ', '.join('data.' + key for key in unknown)
    raise ConfigError(
        f'Unknown data config field(s) {names}; '
        'gaternet_jax.datasets.DATA_DEFAULTS lists the fields.'
    )
  # Merged as a plain dict so that the values are not type-checked against
  # the defaults': the loaders check them and say what is wrong.
  return ml_collections.ConfigDict({**DATA_DEFAULTS, **fields})


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
  def augmentation(
      self,
  ) -> augment.Augmentation | augment.SegmentationAugmentation:
    """The augmentation the train step applies to this dataset's batches:
    the config's pad-crop and flip for in-memory data, none where the
    dataset augments its batches itself (tf.data)."""

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches of `batch_size` per epoch, the same on every
    process; raises ConfigError if there is not one."""

  def train_batches(
      self, batch_size: int, seed: int, start_step: int = 0
  ) -> Iterator[Batch]:
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
