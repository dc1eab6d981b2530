"""Streaming ImageNet-scale datasets on tf.data, with the trainer's interface.

`load_imagenet(data_cfg)` returns a `TfdataDataset`, a `datasets.Dataset`
as `data.InMemoryDataset` is, but one that decodes, crops and flips JPEGs
on the host CPUs with tf.data while the accelerators train (so the train
step augments nothing more, and there are no train arrays to put on the
devices).

Sources (`data.name`):
  imagenet2012   a prepared TFDS dataset in `data.data_dir` (`data.tfds_name`
                 picks another TFDS image classification dataset with 'image'
                 and 'label' features). Images stay encoded until the fused
                 decode-and-crop (tfds.decode.SkipDecoding).
  image_folder   `data_dir/<split>/<class>/*.JPEG|jpg|jpeg|png`, labels from
                 the sorted class folder names of the train split (for
                 ImageNet the sorted synsets, the same order as TFDS).

Output: uint8 images (rows, size, size, 3) and int32 labels; normalisation
with `mean`/`std` happens in the jitted step (augment.preprocess). Each of
the P processes reads a disjoint shard of the records (TFDS:
tfds.split_for_jax_process; folders: every P-th file) and yields only its
rows of each global batch, global_batch // P of them.

Determinism and resume:
  Each epoch's pipeline is built with its own seeds, drawn from
  (seed, epoch, process_index): the file/record order of epoch e and the
  augmentation of every example are functions of those alone. Augmentation
  uses stateless random ops seeded by (epoch seed, position in the epoch),
  and tf.data runs with `deterministic=True`, so parallelism does not change
  the output. A run resumed at `start_step` rebuilds epoch
  start_step // steps_per_epoch and skips its consumed examples *before*
  decoding. For image folders the epoch order is a full permutation of the
  file list computed up front, so the skip is free; for TFDS (file shuffle
  plus a shuffle buffer) the skipped records are still read, once: resuming
  costs reading, not decoding, the consumed part of one epoch.
  Each epoch uses steps_per_epoch = (smallest process shard) // rows per
  process full batches, the same on every process; the rest of an epoch's
  shuffled records are dropped, as batching.train_batches drops the last
  partial batch. The next epoch's pipeline is built and started in a
  background thread a few batches (about a shuffle buffer) before the
  current one ends, so epoch boundaries do not stall the step.

Caching (`data.cache`): eval examples are kept in memory decoded and
cropped (uint8, size x size) after the first full pass; train records are
kept encoded, and each epoch then shuffles all of this process's records in
one buffer (a full shuffle). Use it when those fit in host memory.

TensorFlow is imported lazily inside the functions that need it, so the
package imports and runs without it; it is hidden from the GPUs because it
only feeds data.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from gaternet_jax import augment
from gaternet_jax import datasets
from gaternet_jax import paths
from gaternet_jax import sources
from gaternet_jax.errors import ConfigError, DataError

__all__ = [
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'Preprocessing',
    'TfdataDataset',
    'from_file_lists',
    'load_imagenet',
    'make_eval_preprocess',
    'make_train_preprocess',
]

# Per-channel statistics of ImageNet in [0, 1] units (the torchvision ones,
# which the official GaterNet checkpoints were trained with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESIZE_METHODS = ('bilinear', 'bicubic', 'area', 'lanczos3', 'nearest')
_EVAL_SPLIT_FALLBACKS = ('val', 'validation', 'test')
_INSTALL_HINT = 'run `pip install tensorflow-cpu tensorflow-datasets`'
_MAX_CROP_ATTEMPTS = 10


# ----------------------------------------------------------------------------
# Lazy TensorFlow.


def _import_tf():
  """The tensorflow module, with its GPUs hidden; DataError if missing."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f'The streaming ImageNet input pipeline needs TensorFlow ({e}); '
        f'{_INSTALL_HINT}.'
    ) from e
  sources.hide_accelerators(tf)
  return tf


def _data_options(tf):
  options = tf.data.Options()
  # Parallel maps and interleaves keep their input order, so the stream is a
  # function of the seeds alone.
  options.deterministic = True
  # Parallelism comes from the parallel map over examples; intra-op threads
  # on top of it would only oversubscribe the cores.
  options.threading.max_intra_op_parallelism = 1
  return options


# ----------------------------------------------------------------------------
# Preprocessing: encoded image bytes -> uint8 (size, size, 3).


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How images are cropped and resized.

  Attributes:
    image_size: side of the square output (224; 299 for Inception-v4).
    crop_area_range: train crop area as a fraction of the image's area.
    aspect_ratio_range: train crop width / height.
    eval_crop_fraction: eval resizes the short side to
      int(image_size / eval_crop_fraction) and keeps the central square.
    resize_method: a tf.image.resize method, 'bilinear' or 'bicubic'.
    antialias: low-pass filter when downscaling, as PIL (and so torchvision)
      always does.
  """

  image_size: int = datasets.DATA_DEFAULTS['image_size']
  crop_area_range: Tuple[float, float] = datasets.DATA_DEFAULTS[
      'crop_area_range'
  ]
  aspect_ratio_range: Tuple[float, float] = datasets.DATA_DEFAULTS[
      'aspect_ratio_range'
  ]
  eval_crop_fraction: float = datasets.DATA_DEFAULTS['eval_crop_fraction']
  resize_method: str = datasets.DATA_DEFAULTS['resize_method']
  antialias: bool = datasets.DATA_DEFAULTS['antialias']

  @classmethod
  def from_config(cls, data_cfg) -> 'Preprocessing':
    """The preprocessing of `data_cfg` (a ConfigDict or mapping of
    `config.data` fields; those left out take datasets.DATA_DEFAULTS').

    Raises:
      ConfigError: a field is out of range or unknown.
    """
    data_cfg = datasets.data_config(data_cfg)
    size = data_cfg.image_size
    if (
        isinstance(size, bool)
        or not isinstance(size, (int, np.integer))
        or (size < 1)
    ):
      raise ConfigError(f'data.image_size={size!r} must be a positive int.')
    area = _float_range(data_cfg, 'crop_area_range')
    if not 0 < area[0] <= area[1] <= 1:
      raise ConfigError(
          f'data.crop_area_range={area} must satisfy ' '0 < low <= high <= 1.'
      )
    ratio = _float_range(data_cfg, 'aspect_ratio_range')
    if not 0 < ratio[0] <= ratio[1]:
      raise ConfigError(
          f'data.aspect_ratio_range={ratio} must satisfy ' '0 < low <= high.'
      )
    fraction = float(data_cfg.eval_crop_fraction)
    if not 0 < fraction <= 1:
      raise ConfigError(
          f'data.eval_crop_fraction={fraction} must be in (0, 1].'
      )
    method = data_cfg.resize_method
    if method not in _RESIZE_METHODS:
      raise ConfigError(
          f'data.resize_method={method!r} must be one of '
          f'{", ".join(_RESIZE_METHODS)}.'
      )
    return cls(
        image_size=int(size),
        crop_area_range=area,
        aspect_ratio_range=ratio,
        eval_crop_fraction=fraction,
        resize_method=method,
        antialias=bool(data_cfg.antialias),
    )


def _float_range(data_cfg, key):
  """(low, high) floats of the complete `data_cfg`'s field `key`."""
  value = data_cfg[key]
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(
        f'data.{key}={value!r} must be a pair of numbers (low, high).'
    ) from None
  return (low, high)


def _resize_to_uint8(tf, image, prep: Preprocessing):
  """(h, w, 3) uint8 -> (size, size, 3) uint8."""
  size = prep.image_size
  image = tf.image.resize(
      image, [size, size], method=prep.resize_method, antialias=prep.antialias
  )
  # Bicubic and lanczos overshoot [0, 255]; round rather than truncate.
  image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
  return tf.ensure_shape(image, [size, size, 3])


def _decode_window(tf, encoded, window_fn):
  """Decodes the window `window_fn(shape)` -> [y, x, h, w] of an image.

  JPEGs decode only the window (decode_and_crop_jpeg reads the header for
  the shape first); other formats (PNG, GIF, BMP: the ImageNet train set
  has PNGs named .JPEG) decode whole and are sliced. channels=3 turns
  grayscale and CMYK into RGB.
  """

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    window = window_fn(tf.shape(image))
    return tf.slice(
        image,
        tf.stack([window[0], window[1], 0]),
        tf.stack([window[2], window[3], 3]),
    )

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def make_train_preprocess(prep: Preprocessing):
  """A tf function (encoded bytes, seed (2,) int64) -> uint8 (size, size, 3).

  Inception-style random-resized crop fused with the JPEG decode, resize,
  random horizontal flip. Stateless: the same seed gives the same image.
  """
  tf = _import_tf()
  low_ratio, high_ratio = prep.aspect_ratio_range

  def fallback_window(height, width):
    # The whole image, or its central part with the aspect ratio clamped to
    # the allowed range (torchvision's fallback when sampling fails).
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ratio = w / h
    crop_w = tf.where(ratio > high_ratio, tf.round(h * high_ratio), w)
    crop_h = tf.where(ratio < low_ratio, tf.round(w / low_ratio), h)
    crop_h = tf.clip_by_value(tf.cast(crop_h, tf.int32), 1, height)
    crop_w = tf.clip_by_value(tf.cast(crop_w, tf.int32), 1, width)
    return tf.stack(
        [(height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w]
    )

  def preprocess(encoded, seed):
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2)
    )

    def window_fn(shape):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape,
          bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
          seed=crop_seed,
          min_object_covered=0.0,
          aspect_ratio_range=prep.aspect_ratio_range,
          area_range=prep.crop_area_range,
          max_attempts=_MAX_CROP_ATTEMPTS,
          use_image_if_no_bounding_boxes=True,
      )
      # After max_attempts misses the op returns the whole image; a whole
      # image outside the ratio range becomes its clamped central crop.
      whole = (size[0] == shape[0]) & (size[1] == shape[1])
      sampled = tf.stack([begin[0], begin[1], size[0], size[1]])
      return tf.where(whole, fallback_window(shape[0], shape[1]), sampled)

    image = _resize_to_uint8(tf, _decode_window(tf, encoded, window_fn), prep)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)

  return preprocess


def make_eval_preprocess(prep: Preprocessing):
  """A tf function encoded bytes -> uint8 (size, size, 3), deterministic.

  Resizing the short side to S = int(size / eval_crop_fraction) and taking
  the central size x size square equals taking the central square of side
  short * size / S of the original and resizing it to size x size; the
  latter is done here, so JPEGs decode only that square.
  """
  tf = _import_tf()
  size = prep.image_size
  resized_short = int(size / prep.eval_crop_fraction)

  def window_fn(shape):
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    side = tf.cast(
        tf.round(tf.cast(short, tf.float32) * (size / resized_short)), tf.int32
    )
    side = tf.clip_by_value(side, 1, short)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])

  def preprocess(encoded):
    return _resize_to_uint8(tf, _decode_window(tf, encoded, window_fn), prep)

  return preprocess


# ----------------------------------------------------------------------------
# Seeds.


@dataclasses.dataclass(frozen=True)
class _EpochSeeds:
  order: int  # permutation of the files / TFDS file shuffle
  buffer: int  # tf.data shuffle buffer
  augment: int  # first word of every example's stateless seed


def _epoch_seeds(seed: int, epoch: int, process_index: int) -> _EpochSeeds:
  # SeedSequence mixes the words well and takes no negative ints.
  words = np.random.SeedSequence(
      [int(seed) % 2**64, epoch, process_index]
  ).generate_state(3, np.uint32)
  return _EpochSeeds(*(int(w) for w in words))


# ----------------------------------------------------------------------------
# Sources: this process's encoded records.


class _FileSource:
  """Image files listed up front; process i reads files i, i + P, ..."""

  def __init__(
      self,
      train_files,
      train_labels,
      eval_files,
      eval_labels,
      process_index,
      process_count,
      num_parallel_calls,
  ):
    self._train = (
        np.asarray(train_files, dtype=object),
        np.asarray(train_labels, np.int32),
    )
    self._eval = (
        np.asarray(eval_files, dtype=object),
        np.asarray(eval_labels, np.int32),
    )
    self._index, self._count = process_index, process_count
    self._parallel = num_parallel_calls
    self._cached_train = None

  def num_examples(self, split: str) -> int:
    return len((self._train if split == 'train' else self._eval)[0])

  def shard_sizes(self, split: str) -> List[int]:
    n = self.num_examples(split)
    return [len(range(i, n, self._count)) for i in range(self._count)]

  def _shard(self, split):
    files, labels = self._train if split == 'train' else self._eval
    sl = slice(self._index, None, self._count)
    return files[sl], labels[sl]

  def _read(self, tf, files, labels):
    ds = tf.data.Dataset.from_tensor_slices((files.astype(str), labels))
    return ds.map(
        lambda path, label: (tf.io.read_file(path), label),
        num_parallel_calls=self._parallel,
    )

  def train_records(
      self, tf, seeds: _EpochSeeds, skip: int, cache: bool, shuffle_buffer: int
  ):
    """(encoded, label) in epoch order, from position `skip` on."""
    del shuffle_buffer  # The permutation below is a full shuffle.
    files, labels = self._shard('train')
    if cache:
      # Bytes held in memory after the first epoch; all of them in the
      # shuffle buffer, so the shuffle is still a full one.
      if self._cached_train is None:
        self._cached_train = self._read(tf, files, labels).cache()
      return self._cached_train.shuffle(
          max(len(files), 1), seed=seeds.buffer, reshuffle_each_iteration=False
      ).skip(skip)
    order = np.random.default_rng(seeds.order).permutation(len(files))[skip:]
    return self._read(tf, files[order], labels[order])

  def shuffle_fill(self, cache: bool, shuffle_buffer: int) -> int:
    """Records read before an epoch's first example comes out."""
    del shuffle_buffer
    return self.shard_sizes('train')[self._index] if cache else 0

  def eval_records(self, tf):
    return self._read(tf, *self._shard('eval'))


class _TfdsSource:
  """A prepared TFDS dataset; process i reads split_for_jax_process's i."""

  def __init__(
      self,
      tfds,
      builder,
      train_split,
      eval_split,
      process_index,
      process_count,
      num_parallel_calls,
  ):
    self._tfds = tfds
    self._builder = builder
    self._index, self._count = process_index, process_count
    self._parallel = num_parallel_calls
    self._splits = {'train': train_split, 'eval': eval_split}
    self._sizes = {}
    for key, split in self._splits.items():
      # Even splits: shards of the records (whole files where the sizes
      # allow), sizes differing by at most one.
      shards = [
          tfds.split_for_jax_process(
              split, process_index=i, process_count=process_count
          )
          for i in range(process_count)
      ]
      self._sizes[key] = [builder.info.splits[s].num_examples for s in shards]
      self._splits[key] = shards[process_index]
    self._cached_train = None

  def num_examples(self, split: str) -> int:
    return sum(self._sizes[split])

  def shard_sizes(self, split: str) -> List[int]:
    return list(self._sizes[split])

  def _read(self, tf, split, shuffle_files, shuffle_seed=None):
    read_config = self._tfds.ReadConfig(
        options=_data_options(tf),
        try_autocache=False,
        shuffle_seed=shuffle_seed,
        shuffle_reshuffle_each_iteration=False,
    )
    ds = self._builder.as_dataset(
        split=self._splits[split],
        shuffle_files=shuffle_files,
        read_config=read_config,
        decoders={'image': self._tfds.decode.SkipDecoding()},
    )
    return ds.map(
        lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)),
        num_parallel_calls=self._parallel,
    )

  def train_records(
      self, tf, seeds: _EpochSeeds, skip: int, cache: bool, shuffle_buffer: int
  ):
    if cache:
      if self._cached_train is None:
        self._cached_train = self._read(tf, 'train', False).cache()
      ds = self._cached_train.shuffle(
          max(self._sizes['train'][self._index], 1),
          seed=seeds.buffer,
          reshuffle_each_iteration=False,
      )
    else:
      ds = self._read(tf, 'train', True, seeds.order)
      if shuffle_buffer > 1:
        ds = ds.shuffle(
            shuffle_buffer, seed=seeds.buffer, reshuffle_each_iteration=False
        )
    # Reads the skipped records, before they are decoded.
    return ds.skip(skip)

  def shuffle_fill(self, cache: bool, shuffle_buffer: int) -> int:
    return self._sizes['train'][self._index] if cache else shuffle_buffer

  def eval_records(self, tf):
    return self._read(tf, 'eval', False)


# ----------------------------------------------------------------------------
# The dataset.


class _InBackground:
  """Runs fn(*args) in a daemon thread; result() waits and returns it."""

  def __init__(self, fn, *args):
    self._value, self._error = None, None
    # A daemon thread: an abandoned iterator must not hold up the exit.
    self._thread = threading.Thread(
        target=self._run, args=(fn, args), name='next_epoch_input', daemon=True
    )
    self._thread.start()

  def _run(self, fn, args):
    try:
      self._value = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e  # Re-raised in the consumer's thread.

  def result(self):
    self._thread.join()
    if self._error is not None:
      raise self._error
    return self._value


def _prefetch(ds, buffer_size):
  return ds.prefetch(buffer_size) if buffer_size else ds  # 0: none.


@dataclasses.dataclass(frozen=True)
class _PipelineOptions:
  shuffle_buffer: int
  cache: bool
  prefetch: int
  num_parallel_calls: int


class TfdataDataset:
  """A streamed train and eval split: a `datasets.Dataset`.

  Attributes:
    name: data.name, 'imagenet2012' or 'image_folder'.
    num_classes: number of classes.
    mean: per-channel mean in [0, 1] units (normalisation in the step).
    std: per-channel std in [0, 1] units.
    test_split_name: the eval split's name, e.g. 'validation' or 'val'.
    process_index: this process's shard, in [0, process_count).
    process_count: number of processes (shards).
  """

  def __init__(
      self,
      *,
      name: str,
      source,
      num_classes: int,
      preprocessing: Preprocessing,
      options: _PipelineOptions,
      mean: Sequence[float],
      std: Sequence[float],
      test_split_name: str,
      process_index: int,
      process_count: int,
  ):
    self.name = name
    self.num_classes = int(num_classes)
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self.test_split_name = test_split_name
    self.process_index = process_index
    self.process_count = process_count
    self.preprocessing = preprocessing
    self._source = source
    self._options = options
    self._eval_examples_ds = None
    self._train_fn = None

  @property
  def image_shape(self) -> tuple:
    size = self.preprocessing.image_size
    return (size, size, 3)

  @property
  def augmentation(self) -> augment.Augmentation:
    """None in the step: the pipeline crops and flips every train image."""
    return augment.NO_AUGMENTATION

  def train_arrays(self) -> None:
    """None: the train split is streamed, never held in memory."""
    return None

  @property
  def num_train_examples(self) -> int:
    return self._source.num_examples('train')

  @property
  def num_test_examples(self) -> int:
    return self._source.num_examples('eval')

  def _rows(self, batch_size: int, what: str) -> int:
    if batch_size < 1 or batch_size % self.process_count:
      raise ConfigError(
          f'{what}={batch_size} must be a positive multiple of the number '
          f'of processes ({self.process_count}).'
      )
    return batch_size // self.process_count

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches per epoch; the same on every process."""
    rows = self._rows(batch_size, 'batch_size')
    steps = min(self._source.shard_sizes('train')) // rows
    if steps < 1:
      raise ConfigError(
          f'batch_size={batch_size} exceeds the {self.num_train_examples} '
          f'training examples ({min(self._source.shard_sizes("train"))} per '
          'process).'
      )
    return steps

  # -- train ------------------------------------------------------------------

  def _epoch_dataset(
      self, rows: int, seed: int, epoch: int, first_step: int, steps: int
  ):
    """Batches `first_step`..steps-1 of epoch `epoch` as a tf.data pipeline."""
    tf = _import_tf()
    opts = self._options
    seeds = _epoch_seeds(seed, epoch, self.process_index)
    skip = first_step * rows
    records = self._source.train_records(
        tf, seeds, skip, opts.cache, opts.shuffle_buffer
    )
    records = records.take(steps * rows - skip)
    preprocess = self._train_preprocess()
    augment_seed = tf.constant(seeds.augment, tf.int64)

    def example(index, record):
      encoded, label = record
      # The position in the epoch (skipped ones counted) seeds the crop and
      # flip, so a resumed run draws the same ones.
      image = preprocess(encoded, tf.stack([augment_seed, index]))
      return {'image': image, 'label': label}

    ds = records.enumerate(start=skip).map(
        example, num_parallel_calls=opts.num_parallel_calls
    )
    ds = _prefetch(ds.batch(rows, drop_remainder=True), opts.prefetch)
    return ds.with_options(_data_options(tf))

  def _train_preprocess(self):
    """make_train_preprocess as a tf.function, traced once."""
    if self._train_fn is None:
      tf = _import_tf()
      # Each epoch builds a new pipeline; calling one traced function keeps
      # that cheap (tracing the preprocessing takes about a second).
      self._train_fn = tf.function(
          make_train_preprocess(self.preprocessing),
          autograph=False,
          input_signature=[
              tf.TensorSpec([], tf.string),
              tf.TensorSpec([2], tf.int64),
          ],
      )
    return self._train_fn

  def _start_epoch(self, rows, seed, epoch, first_step, steps):
    """An iterator over the epoch's numpy batches, its first one fetched."""
    it = self._epoch_dataset(
        rows, seed, epoch, first_step, steps
    ).as_numpy_iterator()
    # Fetching one batch starts the reading threads and fills the shuffle
    # buffer; done in the background near the end of the previous epoch.
    first = next(it)
    return itertools.chain([first], it)

  def train_batches(
      self, batch_size: int, seed: int, start_step: int = 0
  ) -> Iterator[Dict[str, np.ndarray]]:
    """This process's rows of global train batches `start_step`, ... forever.

    Yields:
      {'image': uint8 (batch_size // process_count, size, size, 3),
       'label': int32 (batch_size // process_count,)}. The stream is a
      function of (seed, process_index, process_count, start_step): a run resumed at step k
      sees the batches an uninterrupted run sees at k, k + 1, ...
    """
    rows = self._rows(batch_size, 'batch_size')
    steps = self.steps_per_epoch(batch_size)
    if start_step < 0:
      raise ConfigError(f'start_step={start_step} must be >= 0.')
    # Building an epoch's pipeline and filling its shuffle buffer take a
    # while; the next one starts this many batches before the current ends.
    fill = self._source.shuffle_fill(
        self._options.cache, self._options.shuffle_buffer
    )
    lookahead = min(steps, max(2, -(-fill // rows)))
    return self._chain_epochs(rows, int(seed), start_step, steps, lookahead)

  def _chain_epochs(self, rows, seed, start_step, steps, lookahead):
    epoch, first_step = divmod(start_step, steps)
    batches = self._start_epoch(rows, seed, epoch, first_step, steps)
    while True:
      upcoming = None
      for step in range(first_step, steps):
        if upcoming is None and steps - step <= lookahead:
          upcoming = _InBackground(
              self._start_epoch, rows, seed, epoch + 1, 0, steps
          )
        yield next(batches)
      batches = upcoming.result()
      epoch, first_step = epoch + 1, 0

  # -- eval -------------------------------------------------------------------

  def num_eval_batches(self, batch_size: int) -> int:
    rows = self._rows(batch_size, 'eval_batch_size')
    return -(-max(self._source.shard_sizes('eval')) // rows)

  def _eval_examples(self):
    """This process's preprocessed eval examples, built (and cached) once."""
    if self._eval_examples_ds is None:
      tf = _import_tf()
      opts = self._options
      preprocess = make_eval_preprocess(self.preprocessing)
      ds = self._source.eval_records(tf).map(
          lambda encoded, label: {
              'image': preprocess(encoded),
              'label': label,
              'mask': tf.constant(1.0, tf.float32),
          },
          num_parallel_calls=opts.num_parallel_calls,
      )
      # One dataset object for all calls, so the cache filled by the first
      # full pass serves the later ones.
      self._eval_examples_ds = ds.cache() if opts.cache else ds
    return self._eval_examples_ds

  def _eval_dataset(self, batch_size: int):
    rows = self._rows(batch_size, 'eval_batch_size')
    tf = _import_tf()
    # Every process yields the same number of batches (the step is a
    # collective); rows past this process's shard are padding, mask 0.
    size = self.preprocessing.image_size
    shard = self._source.shard_sizes('eval')[self.process_index]
    padding = self.num_eval_batches(batch_size) * rows - shard
    pad = tf.data.Dataset.from_tensors(
        {
            'image': tf.zeros([size, size, 3], tf.uint8),
            'label': tf.constant(0, tf.int32),
            'mask': tf.constant(0.0, tf.float32),
        }
    ).repeat(padding)
    ds = self._eval_examples()
    ds = ds.concatenate(pad).batch(rows, drop_remainder=True)
    return _prefetch(ds, self._options.prefetch).with_options(_data_options(tf))

  def eval_batches(self, batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
    """The eval split once, in padded global batches with a 'mask'.

    Yields num_eval_batches(batch_size) batches of this process's rows:
    {'image': uint8 (rows, size, size, 3), 'label': int32 (rows,),
     'mask': float32 (rows,)}, mask 0 on padding. Over all processes every
    eval example appears exactly once with mask 1.
    """
    return self._eval_dataset(batch_size).as_numpy_iterator()


# ----------------------------------------------------------------------------
# Loading.


def _pipeline_options(data_cfg, tf) -> _PipelineOptions:
  """The tf.data options of the complete `data_cfg`."""

  def count(key, allow_autotune):
    value = data_cfg[key]
    if value is None or (allow_autotune and value == tf.data.AUTOTUNE):
      return tf.data.AUTOTUNE
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or (value < 0)
    ):
      raise ConfigError(
          f'data.{key}={value!r} must be a non-negative int'
          + (' or None (autotune).' if allow_autotune else '.')
      )
    return int(value)

  return _PipelineOptions(
      shuffle_buffer=count('shuffle_buffer', False),
      cache=bool(data_cfg.cache),
      prefetch=count('prefetch', True),
      num_parallel_calls=count('num_parallel_calls', True) or tf.data.AUTOTUNE,
  )


def _process(process_index, process_count):
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} not in [0, {count}).')
  return int(index), int(count)


def _stats(data_cfg):
  """(mean, std) of the complete `data_cfg`; None takes ImageNet's."""
  mean = data_cfg.mean or IMAGENET_MEAN
  std = data_cfg.std or IMAGENET_STD
  if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
    raise ConfigError(
        f'data.mean={mean} and data.std={std} need 3 values '
        'each, the stds positive.'
    )
  return mean, std


def from_file_lists(
    train_files: Sequence[str],
    train_labels: Sequence[int],
    eval_files: Sequence[str],
    eval_labels: Sequence[int],
    num_classes: int,
    data_cfg,
    *,
    name: str = 'image_folder',
    test_split_name: str = 'val',
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> TfdataDataset:
  """A dataset over explicit lists of image files and their labels.

  Reads the preprocessing and pipeline fields of `data_cfg` (see
  `load_imagenet`); process_index/count default to JAX's.
  """
  data_cfg = datasets.data_config(data_cfg)
  tf = _import_tf()
  index, count = _process(process_index, process_count)
  if len(train_files) != len(train_labels) or len(eval_files) != len(
      eval_labels
  ):
    raise DataError('Every image file needs one label.')
  options = _pipeline_options(data_cfg, tf)
  source = _FileSource(
      train_files,
      train_labels,
      eval_files,
      eval_labels,
      index,
      count,
      options.num_parallel_calls,
  )
  mean, std = _stats(data_cfg)
  return TfdataDataset(
      name=name,
      source=source,
      num_classes=num_classes,
      preprocessing=Preprocessing.from_config(data_cfg),
      options=options,
      mean=mean,
      std=std,
      test_split_name=test_split_name,
      process_index=index,
      process_count=count,
  )


def _folder_split(root, split, classes=None):
  """(files, labels, classes) of root/split, labels from `classes` order."""
  tree = sources.scan_image_folder(paths.join(root, split))
  if not tree or not any(tree.values()):
    raise DataError(
        f'{paths.join(root, split)} holds no <class>/*.JPEG|jpg|png '
        'images; expected the layout <data_dir>/<split>/<class>/<image>.'
    )
  if classes is None:
    classes = list(tree)
  unknown = sorted(set(tree) - set(classes))
  if unknown:
    raise DataError(
        f'{paths.join(root, split)} has class folders {unknown[:5]} that '
        'the train split lacks; both splits need the same classes.'
    )
  files, labels = sources.label_files(tree, classes)
  return files, labels, classes


def _load_image_folder(data_cfg, index, count):
  """The image folder dataset of the complete `data_cfg`."""
  data_dir = data_cfg.data_dir
  if not data_dir:
    raise DataError(
        "data.name='image_folder' needs data.data_dir, the "
        'folder holding <split>/<class>/<image> files.'
    )
  root = os.fspath(data_dir)
  root = root if paths.is_remote(root) else os.path.expanduser(root)
  if not paths.resolve(root).is_dir():
    raise DataError(
        f'data.data_dir {root} is not a directory; check the ' 'path.'
    )
  train_split = data_cfg.train_split
  if not paths.resolve(paths.join(root, train_split)).is_dir():
    raise DataError(
        f'{root} has no {train_split}/ subfolder; expected the '
        'layout <data_dir>/train/<class>/<image>.'
    )
  eval_split = data_cfg.eval_split
  candidates = [eval_split] if eval_split else []
  if not eval_split or eval_split in _EVAL_SPLIT_FALLBACKS:
    candidates += [s for s in _EVAL_SPLIT_FALLBACKS if s not in candidates]
  found = [s for s in candidates if paths.resolve(paths.join(root, s)).is_dir()]
  if not found:
    raise DataError(
        f'{root} has none of the eval subfolders '
        f'{", ".join(candidates)}; add one laid out like train/.'
    )
  train_files, train_labels, classes = _folder_split(root, train_split)
  eval_files, eval_labels, _ = _folder_split(root, found[0], classes)
  return from_file_lists(
      train_files,
      train_labels,
      eval_files,
      eval_labels,
      len(classes),
      data_cfg,
      name='image_folder',
      test_split_name=found[0],
      process_index=index,
      process_count=count,
  )


def _load_tfds(data_cfg, index, count):
  """The TFDS dataset of the complete `data_cfg`."""
  tf = _import_tf()
  name = data_cfg.tfds_name
  data_dir = data_cfg.data_dir or None  # '' is TFDS's default too.
  if data_dir and not tf.io.gfile.exists(data_dir):
    raise DataError(
        f'data.data_dir {data_dir} does not exist; check the ' 'path.'
    )
  train_split = data_cfg.train_split
  eval_split = data_cfg.eval_split or 'validation'  # '': TFDS's eval split.
  tfds, builder = sources.tfds_builder(
      name,
      data_dir,
      (train_split, eval_split),
      needs='data.name=imagenet2012 reads',
      alternative="use data.name='image_folder'",
      hint=(
          f'prepare it with `tfds build {name} --data_dir=<dir> '
          '--manual_dir=<dir with the ILSVRC2012 tars>` or use '
          "data.name='image_folder'"
      ),
      split_hint='set data.train_split / data.eval_split',
  )
  features = builder.info.features
  options = _pipeline_options(data_cfg, tf)
  source = _TfdsSource(
      tfds,
      builder,
      train_split,
      eval_split,
      index,
      count,
      options.num_parallel_calls,
  )
  mean, std = _stats(data_cfg)
  return TfdataDataset(
      name=data_cfg.name,
      source=source,
      num_classes=features['label'].num_classes,
      preprocessing=Preprocessing.from_config(data_cfg),
      options=options,
      mean=mean,
      std=std,
      test_split_name=eval_split,
      process_index=index,
      process_count=count,
  )


def load_imagenet(
    data_cfg,
    *,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> TfdataDataset:
  """The streamed dataset `data_cfg` describes (a ConfigDict or mapping).

  Fields read, with their defaults (datasets.DATA_DEFAULTS, which fill in
  the fields `data_cfg` leaves out):
    name: 'imagenet2012' (TFDS) or 'image_folder'.
    tfds_name: 'imagenet2012'; the TFDS dataset that name='imagenet2012'
      reads.
    data_dir: the TFDS data_dir (None: TFDS's default) or the image folder.
    image_size: 224.
    train_split, eval_split: TFDS 'train' / 'validation'; folders 'train' /
      'val', falling back to 'validation' then 'test'.
    cache: False (see the module docstring).
    shuffle_buffer: 10_000 encoded records (TFDS only: folders shuffle the
      whole file list).
    prefetch, num_parallel_calls: None, i.e. tf.data.AUTOTUNE.
    crop_area_range: (0.08, 1.0); aspect_ratio_range: (3/4, 4/3).
    eval_crop_fraction: 0.875.
    resize_method: 'bilinear'; antialias: True.
    mean, std: None, i.e. IMAGENET_MEAN / IMAGENET_STD.

  process_index/process_count default to jax.process_index()/count(); tests
  pass them to simulate several hosts.

  Raises:
    DataError: TensorFlow is missing, or the data on disk is missing or
      malformed.
    ConfigError: a config value is out of range, or a field is unknown.
  """
  data_cfg = datasets.data_config(data_cfg)
  index, count = _process(process_index, process_count)
  name = data_cfg.name
  if name == 'imagenet2012':
    return _load_tfds(data_cfg, index, count)
  if name == 'image_folder':
    _import_tf()
    return _load_image_folder(data_cfg, index, count)
  raise DataError(
      f'Unknown streaming dataset data.name={name!r}; use '
      "'imagenet2012' (TFDS) or 'image_folder'."
  )
