"""In-memory image datasets as host numpy arrays, and `load_dataset`.

Every source gives uint8 images (N, H, W, C) and int32 labels (N,); the
training loop moves them to the device and augments them there, in JAX,
with the pad-crop and flip of `data.crop_padding` and `data.flip`.
`load_dataset` also hands streamed datasets (input_pipeline.py) and
synthetic ones out; all implement `datasets.Dataset`.

Sources (`data.name` / `data.source`):
  digits   / builtin         scikit-learn's bundled 8x8 digits, no download.
  shapes   / builtin         synthetic segmentation (shapes.py): per-pixel
                             masks, no download.
  cityscapes / folder | tfds semantic segmentation, streamed
                             (cityscapes.py).
  cifar10  / folder          train/<class>/*.png|jpg|jpeg + test/<class>/*,
  cifar100                   as a directory or a .tar(.gz) read in memory.
           / python_archive  the official cifar-10(0)-python pickles,
                             read with a restricted unpickler.
           / tfds            tensorflow_datasets (optional dependency).
"""

import codecs
import contextlib
import dataclasses
import gzip
import importlib.util
import io
import os
import pickle
import tarfile
import zlib

from typing import Dict, Tuple

import numpy as np
from PIL import Image

from gaternet_jax import augment
from gaternet_jax import batching
from gaternet_jax import datasets
from gaternet_jax import paths
from gaternet_jax import sharding
from gaternet_jax import sources
from gaternet_jax.errors import ConfigError, DataError

__all__ = [
    'FakeDataset',
    'InMemoryDataset',
    'dataset_info',
    'load_dataset',
    'train_augmentation',
]

_NUM_CLASSES = {'digits': 10, 'cifar10': 10, 'cifar100': 100}
_SOURCES = ('folder', 'python_archive', 'tfds')
_SPLITS = ('train', 'test')


# eq=False: field-wise == on numpy arrays is ambiguous, and an identity hash
# keeps the (frozen) dataset usable as a dict key.
@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
  """A train and a test split held in host memory.

  Attributes:
    name: 'digits', 'cifar10' or 'cifar100'.
    train_images: (N, H, W, C) uint8.
    train_labels: (N,) int32 in [0, num_classes).
    test_images: (M, H, W, C) uint8.
    test_labels: (M,) int32.
    num_classes: number of classes.
    mean: per-channel mean in [0, 1] units, len C.
    std: per-channel std in [0, 1] units, len C.
    test_split_name: 'test', or 'validation' when a hold-out of the training
      images replaced the test set.
    augmentation: the pad-crop and flip the train step applies
      (`train_augmentation` of the dataset's config).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple
  std: tuple
  test_split_name: str
  augmentation: augment.Augmentation | augment.SegmentationAugmentation

  # The rest of datasets.Dataset.
  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])

  @property
  def num_train_examples(self) -> int:
    return len(self.train_images)

  @property
  def num_test_examples(self) -> int:
    return len(self.test_images)

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    return batching.steps_per_epoch(self.num_train_examples, batch_size)

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0):
    """This process's rows of global train batches from `start_step` on."""
    return batching.train_batches(
        self.train_images, self.train_labels, batch_size, seed, start_step
    )

  def eval_batches(self, batch_size: int):
    """The test split in padded global batches with a 'mask'."""
    return batching.eval_batches(self.test_images, self.test_labels, batch_size)

  def train_arrays(self) -> Dict[str, np.ndarray]:
    """The whole train split: {'image': (N, H, W, C) uint8, 'label': (N,)
    int32}."""
    return {'image': self.train_images, 'label': self.train_labels}


_IMAGE_SHAPES = {
    'digits': (8, 8, 1),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
}
# Streamed through tf.data (gaternet_jax.input_pipeline), or synthetic.
_STREAMED = ('imagenet2012', 'image_folder')
_FAKE = 'fake'
# Segmentation: per-pixel masks, jointly augmented in the train step.
_SHAPES, _CITYSCAPES = 'shapes', 'cityscapes'
_SEGMENTATION = (_SHAPES, _CITYSCAPES)


def _pair(value, what: str) -> Tuple[int, int]:
  """An int side or a (height, width) pair as (height, width) ints >= 1."""
  pair = (value, value) if isinstance(value, (int, np.integer)) else value
  try:
    h, w = (int(v) for v in pair)
    ok = h >= 1 and w >= 1 and not isinstance(value, bool)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
        f'data.{what}={value!r} must be a side >= 1 or a (height, width) '
        'pair.'
    )
  return h, w


def segmentation_size(data_cfg) -> Tuple[int, int]:
  """(height, width) of a segmentation dataset's images: `image_size` (an
  int side, or a pair); for Cityscapes `cityscapes.frame_size`'s (an int s
  is s x 2s), 0 or None its native 1024x2048."""
  if data_cfg.name == _CITYSCAPES:
    from gaternet_jax import cityscapes  # pylint: disable=g-import-not-at-top

    return cityscapes.frame_size(data_cfg.image_size) or cityscapes.NATIVE_SIZE
  return _pair(data_cfg.image_size, 'image_size')


def _segmentation_augmentation(data_cfg) -> augment.SegmentationAugmentation:
  """The joint rescale, crop and flip of a segmentation train step."""
  crop = data_cfg.crop_size
  crop_hw = (
      segmentation_size(data_cfg) if not crop else _pair(crop, 'crop_size')
  )
  try:
    lo, hi = (float(v) for v in data_cfg.scale_range)
    ok = 0 < lo <= hi
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
        f'data.scale_range={data_cfg.scale_range!r} must be (low, high) '
        'with 0 < low <= high.'
    )
  ignore = data_cfg.ignore_label
  if isinstance(ignore, bool) or not isinstance(ignore, (int, np.integer)):
    raise ConfigError(f'data.ignore_label={ignore!r} must be an integer.')
  if data_cfg.crop_padding:
    raise ConfigError(
        f'data.crop_padding is for classification; {data_cfg.name} crops '
        'with data.crop_size (and rescales with data.scale_range).'
    )
  return augment.SegmentationAugmentation(
      crop_size=crop_hw,
      scale_range=(lo, hi),
      flip=bool(data_cfg.flip),
      ignore_label=int(ignore),
  )


def train_augmentation(
    data_cfg,
) -> augment.Augmentation | augment.SegmentationAugmentation:
  """The augmentation the train step applies to `data_cfg`'s dataset.

  In-memory and synthetic datasets are augmented in the step with the
  config's `crop_padding` (default 0) and `flip` (default False); streamed
  ones crop and flip in their tf.data pipeline, so the step adds nothing.
  Segmentation datasets get the joint rescale (`scale_range`), crop
  (`crop_size`) and flip of image and mask (SegmentationAugmentation).
  `load_dataset` gives every dataset this; a setup without data (the
  benchmark) reads it here.

  Args:
    data_cfg: a ConfigDict or mapping of `config.data` fields; those left
      out take their datasets.DATA_DEFAULTS value.

  Returns:
    The step's augmentation.Augmentation.

  Raises:
    ConfigError: crop_padding is no non-negative int, a streamed dataset
      sets crop_padding or flip (the step would augment twice), or a field
      is unknown.
  """
  data_cfg = datasets.data_config(data_cfg)
  name = data_cfg.name
  if name in _SEGMENTATION:
    return _segmentation_augmentation(data_cfg)
  crop_padding = data_cfg.crop_padding or 0  # None counts as 0.
  flip = bool(data_cfg.flip)
  if (
      isinstance(crop_padding, bool)
      or not isinstance(crop_padding, (int, np.integer))
      or crop_padding < 0
  ):
    raise ConfigError(
        f'data.crop_padding={crop_padding!r} must be a ' 'non-negative integer.'
    )
  if name in _STREAMED:
    if crop_padding or flip:
      raise ConfigError(
          f'data.crop_padding and data.flip are for in-memory datasets; '
          f'{name} crops and flips in its tf.data pipeline '
          '(data.crop_area_range, data.aspect_ratio_range), so leave them '
          'unset.'
      )
    return augment.NO_AUGMENTATION
  return augment.Augmentation(crop_padding=int(crop_padding), flip=flip)


def dataset_info(data_cfg):
  """`(image_shape, num_classes)` of `data_cfg`'s dataset, without loading.

  ImageNet-style datasets take their size from `data_cfg.image_size` and,
  for image folders and fake data, their classes from `data_cfg.num_classes`
  (fields left out take their datasets.DATA_DEFAULTS value).

  Raises:
    DataError: the config names an unknown dataset.
    ConfigError: the config has an unknown field.
  """
  data_cfg = datasets.data_config(data_cfg)
  name = data_cfg.name
  if name in _SEGMENTATION:
    # pylint: disable=g-import-not-at-top
    from gaternet_jax import cityscapes
    from gaternet_jax import shapes

    classes = shapes.NUM_CLASSES if name == _SHAPES else cityscapes.NUM_CLASSES
    return segmentation_size(data_cfg) + (3,), classes
  if name in _STREAMED or name == _FAKE:
    size = int(data_cfg.image_size)
    classes = 1000 if name == 'imagenet2012' else int(data_cfg.num_classes)
    return (size, size, 3), classes
  if name not in _NUM_CLASSES:
    raise DataError(
        f'Unknown dataset name {name!r}; expected one of '
        f'{", ".join(sorted(_NUM_CLASSES) + list(_STREAMED))}, '
        f'{_FAKE}, {", ".join(_SEGMENTATION)}.'
    )
  return _IMAGE_SHAPES[name], _NUM_CLASSES[name]


@dataclasses.dataclass(frozen=True)
class FakeDataset:
  """Random uint8 images and labels, made per batch: benchmarks and smoke
  runs of ImageNet-sized models without a dataset (configs/imagenet_fake.py).

  Batches are a function of (seed, step), so resuming repeats them.
  """

  name: str
  image_shape: tuple
  num_classes: int
  num_train_examples: int
  num_test_examples: int
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.25, 0.25, 0.25)
  test_split_name: str = 'test'
  augmentation: augment.Augmentation = augment.NO_AUGMENTATION

  def _batch(self, batch_size, seed, step, split=0):
    rng = np.random.default_rng([seed, step, split])
    rows = sharding.process_slice(batch_size)
    images = rng.integers(0, 256, (batch_size,) + self.image_shape, np.uint8)
    labels = rng.integers(0, self.num_classes, batch_size).astype(np.int32)
    return {'image': images[rows], 'label': labels[rows]}

  def steps_per_epoch(self, batch_size: int) -> int:
    return batching.steps_per_epoch(self.num_train_examples, batch_size)

  def train_batches(self, batch_size: int, seed: int, start_step: int = 0):
    step = start_step
    while True:
      yield self._batch(batch_size, seed, step)
      step += 1

  def eval_batches(self, batch_size: int):
    n = self.num_test_examples
    for i, start in enumerate(range(0, n, batch_size)):
      batch = self._batch(batch_size, 0, i, split=1)
      mask = (np.arange(start, start + batch_size) < n).astype(np.float32)
      batch['mask'] = mask[sharding.process_slice(batch_size)]
      yield batch

  def train_arrays(self) -> None:
    """None: the images are made per batch, never held."""
    return None


def load_dataset(data_cfg) -> datasets.Dataset:
  """Loads the dataset described by `data_cfg` (a ConfigDict or mapping).

  Fields read: name, source, data_dir, validation_holdout, holdout_seed,
  num_train_examples, num_test_examples, mean, std, crop_padding, flip;
  streamed datasets read input_pipeline.load_imagenet's. Fields left out
  take their datasets.DATA_DEFAULTS value.

  Returns:
    An InMemoryDataset (digits, CIFAR), a FakeDataset ('fake') or an
    input_pipeline.TfdataDataset (ImageNet-style, streamed).

  Raises:
    DataError: the config names an unknown dataset or source, or the data
      on disk is missing or malformed.
    ConfigError: a config value is out of range, or a field is unknown.
  """
  data_cfg = datasets.data_config(data_cfg)
  name = data_cfg.name
  augmentation = train_augmentation(data_cfg)
  if name in _STREAMED:
    from gaternet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

    return input_pipeline.load_imagenet(data_cfg)
  if name == _CITYSCAPES:
    from gaternet_jax import cityscapes  # pylint: disable=g-import-not-at-top

    return cityscapes.load_cityscapes(data_cfg, augmentation)
  if name == _SHAPES:
    return _load_shapes(data_cfg, augmentation)
  if name == _FAKE:
    shape, classes = dataset_info(data_cfg)
    return FakeDataset(
        name,
        shape,
        classes,
        _get_count(data_cfg, 'num_train_examples') or 1_281_167,
        _get_count(data_cfg, 'num_test_examples') or 50_000,
        augmentation=augmentation,
    )
  if name not in _NUM_CLASSES:
    raise DataError(
        f'Unknown dataset data.name={name!r}; use one of '
        f'{", ".join(sorted(_NUM_CLASSES) + list(_STREAMED))}, {_FAKE}, '
        f'{", ".join(_SEGMENTATION)}.'
    )
  num_classes = _NUM_CLASSES[name]
  holdout = _get_count(data_cfg, 'validation_holdout')
  holdout_seed = _get_count(data_cfg, 'holdout_seed')
  num_train = _get_count(data_cfg, 'num_train_examples')
  num_test = _get_count(data_cfg, 'num_test_examples')

  if name == 'digits':
    train, test = _load_digits()
  else:
    source = data_cfg.source
    data_dir = data_cfg.data_dir
    if source == 'folder':
      train, test = _load_folder(name, num_classes, data_dir)
    elif source == 'python_archive':
      train, test = _load_python_archive(name, num_classes, data_dir)
    elif source == 'tfds':
      train, test = _load_tfds(name, num_classes, data_dir)
    else:
      raise DataError(
          f'Unknown data.source={source!r} for {name}; use one of '
          f'{", ".join(_SOURCES)}.'
      )

  test_split_name = 'test'
  if holdout:
    train, test = _hold_out(train, holdout, holdout_seed)
    test_split_name = 'validation'
  # Caps come after the hold-out so the validation set stays the one the
  # seed picked, whatever the cap.
  if num_train:
    train = (train[0][:num_train], train[1][:num_train])
  if num_test:
    test = (test[0][:num_test], test[1][:num_test])

  train_images, train_labels = _finalize(*train)
  test_images, test_labels = _finalize(*test)
  channels = train_images.shape[-1]
  mean, std = data_cfg.mean, data_cfg.std
  if mean is None or std is None:
    computed_mean, computed_std = _channel_stats(train_images)
    mean = computed_mean if mean is None else mean
    std = computed_std if std is None else std
  mean = _check_stats('mean', mean, channels)
  std = _check_stats('std', std, channels)
  if any(s <= 0 for s in std):
    raise DataError(
        f'Per-channel std {std} must be positive; set data.std or check '
        'that the training images are not constant.'
    )
  return InMemoryDataset(
      name=name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=num_classes,
      mean=mean,
      std=std,
      test_split_name=test_split_name,
      augmentation=augmentation,
  )


def _load_shapes(data_cfg, augmentation) -> InMemoryDataset:
  """The synthetic segmentation dataset (shapes.py): `num_train_examples`
  (0: 2,000) and `num_test_examples` (0: 500) images of `image_size`,
  drawn from `holdout_seed`."""
  from gaternet_jax import shapes  # pylint: disable=g-import-not-at-top

  h, w = segmentation_size(data_cfg)
  if h != w:
    raise ConfigError(
        f'data.image_size={data_cfg.image_size!r}: shapes images are square.'
    )
  num_train = _get_count(data_cfg, 'num_train_examples') or SHAPES_TRAIN
  num_test = _get_count(data_cfg, 'num_test_examples') or SHAPES_TEST
  seed = _get_count(data_cfg, 'holdout_seed')
  ignore = int(data_cfg.ignore_label)
  train = shapes.generate(num_train, h, seed + shapes.TRAIN_SEED, ignore)
  test = shapes.generate(num_test, h, seed + shapes.TEST_SEED, ignore)
  mean, std = data_cfg.mean, data_cfg.std
  if mean is None or std is None:
    computed_mean, computed_std = _channel_stats(train[0])
    mean = computed_mean if mean is None else mean
    std = computed_std if std is None else std
  return InMemoryDataset(
      name=_SHAPES,
      train_images=train[0],
      train_labels=train[1],
      test_images=test[0],
      test_labels=test[1],
      num_classes=shapes.NUM_CLASSES,
      mean=_check_stats('mean', mean, 3),
      std=_check_stats('std', std, 3),
      test_split_name='test',
      augmentation=augmentation,
  )


# Default split sizes of the shapes dataset.
SHAPES_TRAIN, SHAPES_TEST = 2000, 500


# ----------------------------------------------------------------------------
# Config helpers and post-processing.


def _get_count(data_cfg, key):
  """A non-negative int field of the complete `data_cfg`; None counts as 0."""
  value = data_cfg[key]
  if value is None:
    return 0
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f'data.{key}={value!r} must be a non-negative integer.')
  if value < 0:
    raise DataError(f'data.{key}={value} must be >= 0.')
  return int(value)


def _check_stats(key, values, channels):
  try:
    values = tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise DataError(
        f'data.{key}={values!r} must be a sequence of {channels} numbers.'
    ) from None
  if len(values) != channels:
    raise DataError(
        f'data.{key} has {len(values)} values but the images have '
        f'{channels} channels; give one value per channel or leave it unset.'
    )
  return values


def _hold_out(train, holdout, seed):
  """Splits `holdout` random training images off as a validation set."""
  images, labels = train
  n = len(labels)
  if holdout >= n:
    raise DataError(
        f'data.validation_holdout={holdout} must be smaller than the '
        f'{n} training images.'
    )
  order = np.random.default_rng(seed).permutation(n)
  # Sorted indices keep both parts in the source's order.
  held, kept = np.sort(order[:holdout]), np.sort(order[holdout:])
  return (images[kept], labels[kept]), (images[held], labels[held])


def _finalize(images, labels):
  images = np.ascontiguousarray(images, dtype=np.uint8)
  labels = np.ascontiguousarray(labels, dtype=np.int32)
  return images, labels


def _channel_stats(images):
  """Exact per-channel mean and std of uint8 (N, H, W, C) in [0, 1] units."""
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for c in range(images.shape[-1]):
    # A 256-bin histogram is exact and avoids a float copy of the images.
    counts = np.bincount(images[..., c].ravel(), minlength=256)
    total = counts.sum()
    m = float(counts @ values) / total
    var = float(counts @ (values - m) ** 2) / total
    mean.append(m)
    std.append(var**0.5)
  return tuple(mean), tuple(std)


def _check_labels(labels, num_classes, what):
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f'{what} has labels in [{labels.min()}, {labels.max()}] but '
        f'{num_classes} classes are expected; check data.name and the files.'
    )


# ----------------------------------------------------------------------------
# digits: scikit-learn's bundled 8x8 digits.


def _digits_file() -> str:
  """scikit-learn's bundled digits.csv.gz, found without importing
  scikit-learn (which takes seconds to import)."""
  spec = importlib.util.find_spec('sklearn')
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
        "The digits dataset is scikit-learn's; install it (pip install "
        'scikit-learn).'
    )
  return os.path.join(
      list(spec.submodule_search_locations)[0],
      'datasets',
      'data',
      'digits.csv.gz',
  )


def _approximate_mode(counts: np.ndarray, n: int, rng) -> np.ndarray:
  """`n` draws spread over classes of `counts` in proportion, the draws
  left by rounding down given to the largest remainders (ties broken by
  `rng`): scikit-learn's `_approximate_mode`, which its stratified split
  uses."""
  exact = counts / counts.sum() * n
  floored = np.floor(exact)
  missing = int(n - floored.sum())
  remainder = exact - floored
  for value in np.sort(np.unique(remainder))[::-1]:
    if missing <= 0:
      break
    (tied,) = np.where(remainder == value)
    chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
    floored[chosen] += 1
    missing -= len(chosen)
  return floored.astype(int)


def stratified_split(labels: np.ndarray, test_size: float, seed: int):
  """(train indices, test indices) of scikit-learn's
  `train_test_split(..., test_size, random_state=seed, stratify=labels)`,
  the same draws in the same order (tests/test_data.py checks it against
  scikit-learn)."""
  n = len(labels)
  n_test = int(np.ceil(test_size * n))
  n_train = n - n_test
  rng = np.random.RandomState(seed)
  classes, inverse = np.unique(labels, return_inverse=True)
  counts = np.bincount(inverse)
  by_class = np.split(
      np.argsort(inverse, kind='mergesort'), np.cumsum(counts)[:-1]
  )
  n_i = _approximate_mode(counts, n_train, rng)
  t_i = _approximate_mode(counts - n_i, n_test, rng)
  train, test = [], []
  for i in range(len(classes)):
    order = by_class[i].take(rng.permutation(counts[i]), mode='clip')
    train.extend(order[: n_i[i]])
    test.extend(order[n_i[i] : n_i[i] + t_i[i]])
  return rng.permutation(train), rng.permutation(test)


def _load_digits():
  """(N, 8, 8, 1) uint8 digits with a fixed stratified 80/20 split."""
  with gzip.open(_digits_file(), 'rt') as f:
    table = np.loadtxt(f, delimiter=',')
  # Pixel values are 0..16.
  images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0))
  images = images.astype(np.uint8)[..., None]
  labels = table[:, -1].astype(np.int32)
  train, test = stratified_split(labels, test_size=0.2, seed=0)
  return (images[train], labels[train]), (images[test], labels[test])


# ----------------------------------------------------------------------------
# folder: train/<class>/* and test/<class>/*, on disk or in a tar archive.


def _existing_path(data_dir, source):
  if not data_dir:
    raise DataError(f"data.source='{source}' needs data.data_dir to be set.")
  path = os.fspath(data_dir)
  path = path if paths.is_remote(path) else os.path.expanduser(path)
  if not paths.resolve(path).exists():
    raise DataError(f'data.data_dir {path} does not exist; check the path.')
  return path


def _isdir(path) -> bool:
  return paths.resolve(path).is_dir()


def _isfile(path) -> bool:
  p = paths.resolve(path)
  return p.exists() and not p.is_dir()


@contextlib.contextmanager
def _open_tar(path):
  """A streaming tarfile over `path` (local or gs://): one sequential pass,
  no seeks back into the gzip stream."""
  if not paths.is_remote(path):
    with tarfile.open(path, 'r|*') as tar:
      yield tar
    return
  with paths.resolve(path).open('rb') as f:
    with tarfile.open(fileobj=f, mode='r|*') as tar:
      yield tar


def _load_folder(name, num_classes, data_dir):
  path = _existing_path(data_dir, 'folder')
  if _isdir(path):
    tree = _scan_directory(path)
  else:
    tree = _scan_tar(path)

  train_classes, test_classes = set(tree['train']), set(tree['test'])
  if train_classes != test_classes:
    only_train = sorted(train_classes - test_classes)
    only_test = sorted(test_classes - train_classes)
    raise DataError(
        f'{path}: train/ and test/ have different class folders '
        f'(only in train: {only_train[:5]}, only in test: {only_test[:5]}); '
        'both splits need the same classes.'
    )
  classes = sorted(train_classes)
  if len(classes) != num_classes:
    raise DataError(
        f'{path} has {len(classes)} class folders but {name} has '
        f'{num_classes} classes; check data.name and data.data_dir.'
    )
  for split in _SPLITS:
    for cls in classes:
      if not tree[split][cls]:
        raise DataError(
            f'{path}: {split}/{cls}/ holds no .png/.jpg/.jpeg images.'
        )

  # One decode pass over both splits, so the one-shape check spans both.
  items, labels = [], []
  for split in _SPLITS:
    split_items, split_labels = sources.label_files(tree[split], classes)
    items.extend(split_items)
    labels.append(np.asarray(split_labels, np.int32))
  images = _decode_all(items)
  n_train = len(labels[0])
  return (images[:n_train], labels[0]), (images[n_train:], labels[1])


def _scan_directory(root):
  """{split: {class: [(path, path), ...]}} with files in sorted order."""
  tree = {}
  for split in _SPLITS:
    split_dir = paths.join(root, split)
    if not _isdir(split_dir):
      raise DataError(
          f'{root} has no {split}/ subfolder; expected the layout '
          'train/<class>/*.png and test/<class>/*.png.'
      )
    # (display name, source) pairs, as _scan_tar gives.
    tree[split] = {
        cls: [(p, p) for p in files]
        for cls, files in sources.scan_image_folder(split_dir).items()
    }
  return tree


def _scan_tar(path):
  """Like _scan_directory, for a tar archive read once into memory."""
  files = {}  # tuple of path parts -> bytes
  dirs = set()
  try:
    with _open_tar(path) as tar:
      for member in tar:
        parts = tuple(p for p in member.name.split('/') if p not in ('', '.'))
        if member.isdir():
          dirs.add(parts)
        elif member.isfile() and parts and sources.is_image_name(parts[-1]):
          files[parts] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(
        f'data.data_dir {path} is neither a directory nor a readable tar '
        f'archive ({type(e).__name__}: {e}); give the dataset folder or an '
        'intact .tar/.tar.gz of it.'
    ) from e

  # The layout may sit under a top-level folder: find where 'train'/'test'
  # sit as the third-to-last path component.
  roots = {p[:-3] for p in files if len(p) >= 3 and p[-3] in _SPLITS}
  if not roots:
    raise DataError(
        f'{path} holds no train/<class>/<image> or test/<class>/<image> '
        'files; expected the layout train/<class>/*.png and test/<class>/*.'
    )
  if () in roots:
    root = ()
  elif len(roots) == 1:
    (root,) = roots
  else:
    raise DataError(
        f'{path} holds several train/test trees ({sorted(roots)[:3]}); '
        'keep one dataset per archive.'
    )

  depth = len(root)
  tree = {split: {} for split in _SPLITS}
  for parts in dirs:
    if (
        len(parts) == depth + 2
        and parts[:depth] == root
        and parts[depth] in _SPLITS
        and not parts[-1].startswith('.')
    ):
      tree[parts[depth]].setdefault(parts[-1], [])
  for parts in sorted(files):
    if (
        len(parts) == depth + 3
        and parts[:depth] == root
        and parts[depth] in _SPLITS
    ):
      display = f'{path}:{"/".join(parts)}'
      tree[parts[depth]].setdefault(parts[-2], []).append(
          (display, files[parts])
      )
  for split in _SPLITS:
    if not tree[split]:
      raise DataError(
          f'{path} has no {split}/<class>/ folders; expected the layout '
          'train/<class>/*.png and test/<class>/*.png.'
      )
  return tree


def _decode_one(display, source):
  """(H, W, 3) uint8 from a file path or the file's bytes."""
  if isinstance(source, str) and paths.is_remote(source):
    source = paths.resolve(source).read_bytes()
  fp = io.BytesIO(source) if isinstance(source, bytes) else source
  try:
    with Image.open(fp, formats=('PNG', 'JPEG')) as image:
      if image.mode != 'RGB':
        image = image.convert('RGB')
      return np.asarray(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
        f'Cannot decode image {display} ({type(e).__name__}: {e}); '
        'replace or remove the file.'
    ) from e


def _decode_all(items):
  """(N, H, W, 3) uint8 from a non-empty [(display, source)], one shape."""
  # Serial on purpose: for CIFAR-sized images the cost is Pillow's Python
  # overhead (~100 us/image), which threads only slow down (measured).
  first = _decode_one(*items[0])
  out = np.empty((len(items),) + first.shape, np.uint8)
  out[0] = first
  for i in range(1, len(items)):
    image = _decode_one(*items[i])
    if image.shape != first.shape:
      raise DataError(
          f'{items[i][0]} is {_shape_str(image.shape)} but {items[0][0]} is '
          f'{_shape_str(first.shape)}; all images must have one shape.'
      )
    out[i] = image
  return out


def _shape_str(shape):
  return 'x'.join(str(s) for s in shape)


# ----------------------------------------------------------------------------
# python_archive: the official CIFAR python pickles.


@dataclasses.dataclass(frozen=True)
class _CifarPythonLayout:
  archive: str
  folder: str
  train_files: tuple
  test_files: tuple
  label_key: str


_CIFAR_PYTHON = {
    'cifar10': _CifarPythonLayout(
        archive='cifar-10-python.tar.gz',
        folder='cifar-10-batches-py',
        train_files=tuple(f'data_batch_{i}' for i in range(1, 6)),
        test_files=('test_batch',),
        label_key='labels',
    ),
    'cifar100': _CifarPythonLayout(
        archive='cifar-100-python.tar.gz',
        folder='cifar-100-python',
        train_files=('train',),
        test_files=('test',),
        label_key='fine_labels',
    ),
}


def _latin1_encode(text, encoding='latin1'):
  # Python 3 pickles (protocol <= 2) store bytes as
  # _codecs.encode(str, 'latin1'); allow only that use of it.
  if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError('unexpected _codecs.encode call')
  return codecs.encode(text, encoding)


# Everything a CIFAR batch needs to rebuild its numpy arrays, and no more.
_PICKLE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): np.ndarray.__reduce__(
        np.empty(0)
    )[0],
    ('numpy._core.multiarray', '_reconstruct'): np.ndarray.__reduce__(
        np.empty(0)
    )[0],
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('_codecs', 'encode'): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that can build numpy arrays and plain containers only."""

  def find_class(self, module, name):
    try:
      return _PICKLE_GLOBALS[(module, name)]
    except KeyError:
      raise DataError(
          f'Refusing to load {module}.{name} from a pickle; a CIFAR batch '
          'holds only numpy arrays and lists, so this file is not one.'
      ) from None


def _load_python_archive(name, num_classes, data_dir):
  layout = _CIFAR_PYTHON[name]
  path = _existing_path(data_dir, 'python_archive')
  needed = layout.train_files + layout.test_files
  if _isdir(path):
    if any(_isfile(paths.join(path, f)) for f in needed):
      blobs = _read_pickle_folder(path, needed)
    elif _isdir(paths.join(path, layout.folder)):
      blobs = _read_pickle_folder(paths.join(path, layout.folder), needed)
    elif _isfile(paths.join(path, layout.archive)):
      blobs = _read_pickle_archive(paths.join(path, layout.archive), needed)
    else:
      raise DataError(
          f'{path} holds neither {layout.archive} nor {layout.folder}/; '
          f'download {layout.archive} from '
          'https://www.cs.toronto.edu/~kriz/cifar.html.'
      )
  else:
    blobs = _read_pickle_archive(path, needed)

  splits = []
  for files in (layout.train_files, layout.test_files):
    batches = [
        _unpickle_batch(blobs[f], f, layout.label_key, num_classes)
        for f in files
    ]
    splits.append(
        (
            np.concatenate([b[0] for b in batches]),
            np.concatenate([b[1] for b in batches]),
        )
    )
  return splits[0], splits[1]


def _read_pickle_folder(folder, needed):
  missing = [f for f in needed if not _isfile(paths.join(folder, f))]
  if missing:
    raise DataError(
        f'{folder} lacks {", ".join(missing)}; re-extract or re-download '
        'the official archive.'
    )
  return {f: paths.resolve(paths.join(folder, f)).read_bytes() for f in needed}


def _read_pickle_archive(path, needed):
  """{member basename: bytes} for the `needed` members, read in memory."""
  blobs = {}
  try:
    with _open_tar(path) as tar:
      for member in tar:
        base = member.name.rsplit('/', 1)[-1]
        if member.isfile() and base in needed and base not in blobs:
          blobs[base] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DataError(
        f'Cannot read the archive {path} ({type(e).__name__}: {e}); it is '
        'truncated or not a tar archive, so re-download it.'
    ) from e
  missing = [f for f in needed if f not in blobs]
  if missing:
    raise DataError(
        f'{path} lacks {", ".join(missing)}; it is truncated or not the '
        'official CIFAR python archive for this data.name.'
    )
  return blobs


def _unpickle_batch(blob, what, label_key, num_classes):
  """(images (n, 32, 32, 3) uint8, labels (n,) int32) from one batch."""

  def bad(reason):
    return DataError(
        f'CIFAR batch {what} {reason}; re-download the official archive.'
    )

  try:
    batch = _RestrictedUnpickler(io.BytesIO(blob), encoding='bytes').load()
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Truncated or foreign pickles fail in many ways (EOFError,
    # UnpicklingError, struct/Value/Type errors...): all mean a bad file.
    raise bad(f'is truncated or not a pickle ({type(e).__name__}: {e})') from e
  if not isinstance(batch, dict):
    raise bad(f'holds a {type(batch).__name__}, not a dict')
  batch = {
      (k.decode('latin1') if isinstance(k, bytes) else k): v
      for k, v in batch.items()
  }
  data = batch.get('data')
  if (
      not isinstance(data, np.ndarray)
      or data.dtype != np.uint8
      or data.ndim != 2
      or data.shape[1] != 3 * 32 * 32
  ):
    raise bad("has no uint8 (n, 3072) 'data' array")
  labels = batch.get(label_key)
  if labels is None:
    raise bad(f"has no '{label_key}' entry")
  labels = np.asarray(labels)
  if labels.shape != (data.shape[0],) or (
      labels.size and not np.issubdtype(labels.dtype, np.integer)
  ):
    raise bad(f"has {labels.shape} '{label_key}' for {data.shape[0]} images")
  labels = labels.astype(np.int32)
  _check_labels(labels, num_classes, f'CIFAR batch {what}')
  # Rows are channel-major (1024 R, 1024 G, 1024 B), each row-major 32x32.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


# ----------------------------------------------------------------------------
# tfds: TensorFlow Datasets, an optional dependency.


_TFDS_BATCH = 10_000


def _load_tfds(name, num_classes, data_dir):
  alternative = "use data.source='folder' or 'python_archive'"
  # Downloads and prepares the dataset if needed, as tfds.load does.
  tfds, builder = sources.tfds_builder(
      name,
      data_dir,
      _SPLITS,
      needs="data.source='tfds' needs",
      alternative=alternative,
      hint=f'prepare it with tfds or {alternative}',
      download=True,
  )
  try:
    splits = []
    for split in _SPLITS:
      # Finite batches, not batch_size=-1: that batches by the split sizes
      # in the dataset info, and where those are unknown
      # (tfds.testing.mock_data) it asks TensorFlow for a sys.maxsize batch,
      # which aborts the process.
      ds = builder.as_dataset(
          split=split, batch_size=_TFDS_BATCH, as_supervised=True
      )
      batches = list(tfds.as_numpy(ds))
      if not batches:
        raise ValueError('the split is empty')
      splits.append(
          (
              np.concatenate([b[0] for b in batches]),
              np.concatenate([b[1] for b in batches]),
          )
      )
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises many types (missing files, bad records).
    first_line = str(e).strip().split('\n', 1)[0]
    raise DataError(
        f'TensorFlow Datasets could not load {name} from data_dir='
        f'{data_dir!r} ({type(e).__name__}: {first_line}); prepare it with '
        f'tfds or {alternative}.'
    ) from e

  result = []
  for split, (images, labels) in zip(_SPLITS, splits):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise DataError(
          f'tfds {name}/{split} gave {images.dtype} images of shape '
          f'{images.shape}, not uint8 (N, H, W, C).'
      )
    labels = labels.astype(np.int32)
    _check_labels(labels, num_classes, f'tfds {name}/{split}')
    result.append((images, labels))
  return result[0], result[1]
