"""Cityscapes semantic segmentation (fine labels), streamed from the host.

`load_cityscapes(data_cfg, augmentation)` returns a `CityscapesDataset`, a
`datasets.Dataset` whose batches are decoded per batch with PIL in a thread
pool, a batch or two ahead of the train step:
  {'image': (rows, height, width, 3) uint8,
   'label': (rows, height, width) int32, train ids 0..18 or ignore_label}
(eval batches add 'mask': (rows,) float32, 0 on padding rows). Labels are
the official labelIds mapped to the 19 train ids of cityscapesscripts'
table (`LABEL_ID_TO_TRAIN_ID`); every other id is `data.ignore_label`.

Sources (`data.source`):
  folder  `data.data_dir` holds the extracted official archives:
            leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
            gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
          Splits `data.train_split` ('train') and `data.eval_split` ('' ->
          'val'); frames in sorted <city>/<file> order. No TensorFlow.
  tfds    TFDS 'cityscapes/semantic_segmentation' in `data.data_dir` (None:
          TFDS's default folder). If it is not prepared yet, it is prepared
          as array_record from the manual download folder
          `<data_dir>/downloads/manual`, which must hold
          leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from
          https://www.cityscapes-dataset.com/downloads/. Records are read by
          index (`builder.as_data_source`), left encoded by TFDS and decoded
          here as the folder's PNGs are. Splits 'train' and 'validation' (''
          eval_split); frames in TFDS's record order, a fixed shuffle by a
          hash of each frame's id. TensorFlow (Datasets) is imported only
          inside the functions that read it.

Size (`data.image_size`): an int s means s x 2s (height x width: the frames
are 1024 x 2048, so 512 gives 512 x 1024), a (height, width) pair that
size, and 0 or None the frames' own size (all must then share it). Images
are resized with PIL's bilinear filter (antialiased when downscaling),
labels with nearest neighbour, on the host.

Determinism and resume: the order of training frames is
`batching.epoch_permutation(num_train_examples, seed, epoch)`, the one the
in-memory datasets use, each epoch's last partial batch dropped; every
process computes the same global batch and decodes only its rows
(`sharding.process_slice`). So the stream is a function of (seed,
start_step, the processes) and a run resumed at step k sees the batches an
uninterrupted run sees at k, k + 1, ... Threads change only when a frame is
decoded, never which.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import os
import threading
from typing import (
    Any,
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import ml_collections
import numpy as np
from PIL import Image

from gaternet_jax import batching
from gaternet_jax import datasets
from gaternet_jax import input_pipeline
from gaternet_jax.errors import ConfigError, DataError

__all__ = [
    'LABEL_ID_TO_TRAIN_ID',
    'NUM_CLASSES',
    'TRAIN_ID_NAMES',
    'CityscapesDataset',
    'load_cityscapes',
    'to_train_ids',
    'train_id_table',
]

NAME = 'cityscapes'
NUM_CLASSES = 19
# The 19 evaluated classes of cityscapesscripts' labels.py, in train-id
# order.
TRAIN_ID_NAMES = (
    'road',
    'sidewalk',
    'building',
    'wall',
    'fence',
    'pole',
    'traffic light',
    'traffic sign',
    'vegetation',
    'terrain',
    'sky',
    'person',
    'rider',
    'car',
    'truck',
    'bus',
    'train',
    'motorcycle',
    'bicycle',
)
# labelId -> trainId of the evaluated classes (cityscapesscripts' labels.py);
# every other id (void, flat 'parking', 'caravan', 'trailer', ...) is
# ignored.
LABEL_ID_TO_TRAIN_ID = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}
SOURCES = ('folder', 'tfds')
# Frames are 1024 x 2048: an int image_size s is the height of an s x 2s
# frame.
_WIDTH_PER_HEIGHT = 2
# (height, width) of the official frames.
NATIVE_SIZE = (1024, 2048)
_MAX_THREADS = 8  # default decoding threads, at most
_PREFETCH = 2  # batches decoded ahead of the one the step reads
_FOLDER_EVAL_SPLIT = 'val'
_TFDS_EVAL_SPLIT = 'validation'
_IMAGES = 'leftImg8bit'
_LABELS = 'gtFine'
_IMAGE_SUFFIX = '_leftImg8bit.png'
_LABEL_SUFFIX = '_gtFine_labelIds.png'
_TFDS_NAME = 'cityscapes/semantic_segmentation'
_TFDS_ZIPS = ('leftImg8bit_trainvaltest.zip', 'gtFine_trainvaltest.zip')
_DOWNLOAD_URL = 'https://www.cityscapes-dataset.com/downloads/'
_INSTALL = 'run `pip install tensorflow-cpu tensorflow-datasets`'
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

Batch = Dict[str, np.ndarray]
# An encoded PNG: a local path or its bytes.
_Encoded = Union[str, bytes]


def train_id_table(ignore_label: int = 255) -> np.ndarray:
  """The labelId -> train id lookup table.

  Args:
    ignore_label: the value of every id without a train id.

  Returns:
    (256,) int32: entry i is id i's train id (0..18) or `ignore_label`.
  """
  table = np.full(256, ignore_label, np.int32)
  for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


def to_train_ids(label_ids: np.ndarray, ignore_label: int = 255) -> np.ndarray:
  """Cityscapes labelIds mapped to train ids.

  Args:
    label_ids: integer array of any shape, e.g. a decoded (h, w)
      *_gtFine_labelIds.png; ids outside 0..255 count as unknown.
    ignore_label: the value of every id without a train id.

  Returns:
    int32 array of `label_ids`' shape: train ids 0..18 or `ignore_label`.
  """
  table = train_id_table(ignore_label)
  label_ids = np.asarray(label_ids)
  if label_ids.dtype == np.uint8:
    return table[label_ids]
  ids = label_ids.astype(np.int64)
  known = (ids >= 0) & (ids < len(table))
  return np.where(known, table[np.where(known, ids, 0)], ignore_label).astype(
      np.int32
  )


# ----------------------------------------------------------------------------
# Splits: frames readable by index.


@dataclasses.dataclass(frozen=True)
class _Split:
  """One split's frames.

  Attributes:
    name: the split's name ('train', 'val', 'validation', ...).
    size: number of frames.
    read: index -> (image name, encoded image, labelIds name, encoded
      labelIds), names for messages; safe to call from several threads.
  """

  name: str
  size: int
  read: Callable[[int], Tuple[str, _Encoded, str, _Encoded]]


@dataclasses.dataclass(frozen=True)
class _Decoder:
  """Decodes, resizes and maps one frame.

  Attributes:
    size: `(height, width)` of the output.
    native: whether `size` is the frames' own size (then a frame of another
      size is an error, not resized).
    ignore_label: the label of pixels without a train id.
  """

  size: Tuple[int, int]
  native: bool
  ignore_label: int

  def __call__(
      self,
      image_name: str,
      image_src: _Encoded,
      label_name: str,
      label_src: _Encoded,
  ) -> Tuple[np.ndarray, np.ndarray]:
    """(image (h, w, 3) uint8, label (h, w) int32 train ids) of a frame."""
    height, width = self.size
    with _open_png(image_src, image_name) as image:
      frame_size = image.size  # (width, height), as PIL gives sizes
      if self.native and frame_size != (width, height):
        raise DataError(
            f'{image_name} is {_hw(frame_size)} but the frames are '
            f'{height}x{width}; set data.image_size to resize them.'
        )
      rgb = image if image.mode == 'RGB' else image.convert('RGB')
      if frame_size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
      image_array = np.asarray(rgb, np.uint8)
    with _open_png(label_src, label_name) as label:
      if label.size != frame_size:
        raise DataError(
            f'{label_name} is {_hw(label.size)} but its image is '
            f'{_hw(frame_size)}; replace the file.'
        )
      resized = label
      if frame_size != (width, height):
        resized = label.resize((width, height), Image.Resampling.NEAREST)
      ids = np.asarray(resized)
    if ids.ndim != 2:
      raise DataError(
          f'{label_name} has {ids.shape[-1]} channels, not the one of a '
          'labelIds image; use the *_gtFine_labelIds.png files.'
      )
    return image_array, to_train_ids(ids, self.ignore_label)


def _hw(size: Tuple[int, int]) -> str:
  """'HxW' of a PIL (width, height) size."""
  return f'{size[1]}x{size[0]}'


def _open_png(source: _Encoded, display: str) -> Image.Image:
  """The decoded PIL image of a path or bytes; DataError if unreadable."""
  try:
    image = Image.open(
        io.BytesIO(source) if isinstance(source, bytes) else source
    )
    image.load()
  except FileNotFoundError as e:
    raise DataError(f'{display} does not exist; restore the file.') from e
  except _PIL_ERRORS as e:
    raise DataError(
        f'Cannot decode image {display} ({type(e).__name__}: {e}); '
        'replace or remove the file.'
    ) from e
  return image


def _image_size_of(source: _Encoded, display: str) -> Tuple[int, int]:
  """`(height, width)` from an image's header."""
  try:
    with Image.open(
        io.BytesIO(source) if isinstance(source, bytes) else source
    ) as image:
      width, height = image.size
  except _PIL_ERRORS as e:
    raise DataError(
        f'Cannot decode image {display} ({type(e).__name__}: {e}); '
        'replace or remove the file.'
    ) from e
  return height, width


# ----------------------------------------------------------------------------
# The dataset.


@dataclasses.dataclass(frozen=True, eq=False)
class CityscapesDataset:
  """Cityscapes frames decoded per batch on the host (`datasets.Dataset`).

  Attributes:
    name: 'cityscapes'.
    num_classes: 19 (train ids 0..18; other pixels are `ignore_label`).
    mean, std: per-channel normalisation in [0, 1] units.
    test_split_name: the eval split's name ('val', 'validation', ...).
    image_shape: `(height, width, 3)` of every image.
    augmentation: what the train step applies (the caller's, typically an
      augment.SegmentationAugmentation).
    ignore_label: the label of pixels without a train id.
    num_threads: decoding threads.
  """

  name: str
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  test_split_name: str
  image_shape: Tuple[int, int, int]
  augmentation: Any
  ignore_label: int
  num_threads: int
  train_split: _Split = dataclasses.field(repr=False)
  eval_split: _Split = dataclasses.field(repr=False)
  decoder: _Decoder = dataclasses.field(repr=False)

  @property
  def num_train_examples(self) -> int:
    return self.train_split.size

  @property
  def num_test_examples(self) -> int:
    return self.eval_split.size

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches per epoch (the last partial one is dropped).

    Raises:
      ConfigError: `batch_size` exceeds the train split.
    """
    return batching.steps_per_epoch(self.num_train_examples, batch_size)

  def train_batches(
      self, batch_size: int, seed: int, start_step: int = 0
  ) -> Iterator[Batch]:
    """This process's rows of global train batches `start_step`, ...

    Args:
      batch_size: the global batch size.
      seed: the shuffling seed.
      start_step: the first step's index (a resumed run's step).

    Returns:
      An endless iterator of {'image': (rows, h, w, 3) uint8, 'label':
      (rows, h, w) int32}, rows = batch_size // process_count.

    Raises:
      ConfigError: `batch_size` exceeds the train split.
    """
    indices = batching.train_indices(
        self.num_train_examples, batch_size, seed, start_step
    )
    return self._batches(self.train_split, ((i, None) for i in indices))

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """The eval split once, in order, in padded global batches.

    Returns:
      An iterator of {'image': (rows, h, w, 3) uint8, 'label': (rows, h, w)
      int32, 'mask': (rows,) float32}, mask 0 on the last batch's padding
      rows (which repeat the last frame).
    """
    return self._batches(
        self.eval_split,
        batching.eval_indices(self.num_test_examples, batch_size),
    )

  def train_arrays(self) -> None:
    """None: frames are decoded per batch, never held."""
    return None

  def _batches(
      self,
      split: _Split,
      index_batches: Iterable[Tuple[np.ndarray, Optional[np.ndarray]]],
  ) -> Iterator[Batch]:
    """Decodes this process's rows of each (indices, mask) in a thread pool,
    `_PREFETCH` batches ahead of the one yielded."""
    pool = concurrent.futures.ThreadPoolExecutor(
        self.num_threads, thread_name_prefix='cityscapes'
    )
    decode = self.decoder

    def load(index: int) -> Tuple[np.ndarray, np.ndarray]:
      return decode(*split.read(index))

    pending: Deque[Tuple[List[Any], Optional[np.ndarray]]] = collections.deque()
    try:
      for indices, mask in index_batches:
        pending.append(([pool.submit(load, int(i)) for i in indices], mask))
        if len(pending) > _PREFETCH:
          yield _assemble(*pending.popleft())
      while pending:
        yield _assemble(*pending.popleft())
    finally:
      # An abandoned iterator (a finished run) stops decoding ahead.
      pool.shutdown(wait=False, cancel_futures=True)


def _assemble(futures: List[Any], mask: Optional[np.ndarray]) -> Batch:
  frames = [f.result() for f in futures]
  batch = {
      'image': np.stack([image for image, _ in frames]),
      'label': np.stack([label for _, label in frames]),
  }
  if mask is not None:
    batch['mask'] = mask
  return batch


# ----------------------------------------------------------------------------
# Loading.


def load_cityscapes(
    data_cfg: ml_collections.ConfigDict, augmentation: Any
) -> CityscapesDataset:
  """The Cityscapes dataset `data_cfg` describes.

  Fields read: name ('cityscapes'), source ('folder' or 'tfds'), data_dir,
  image_size, ignore_label, num_train_examples and num_test_examples (> 0
  keeps the first that many frames of a split), train_split, eval_split,
  mean and std (None: ImageNet's), num_parallel_calls (decoding threads;
  None: min(8, CPUs)).

  Args:
    data_cfg: the complete data config (`datasets.data_config(...)`).
    augmentation: the train step's augmentation, kept as the dataset's
      `augmentation`.

  Returns:
    A CityscapesDataset; frames are read only when batches are.

  Raises:
    ConfigError: a config value is out of range.
    DataError: the data is missing or malformed, or TFDS is missing.
  """
  data_cfg = datasets.data_config(data_cfg)
  if data_cfg.name != NAME:
    raise ConfigError(
        f'load_cityscapes reads data.name={NAME!r}, not {data_cfg.name!r}.'
    )
  size = frame_size(data_cfg.image_size)
  ignore_label = _ignore_label(data_cfg.ignore_label)
  num_train = _count(data_cfg, 'num_train_examples')
  num_test = _count(data_cfg, 'num_test_examples')
  num_threads = _num_threads(data_cfg.num_parallel_calls)
  mean = _stats(data_cfg, 'mean', input_pipeline.IMAGENET_MEAN)
  std = _stats(data_cfg, 'std', input_pipeline.IMAGENET_STD)
  train_name = data_cfg.train_split or 'train'
  source = data_cfg.source
  if source == 'folder':
    eval_name = data_cfg.eval_split or _FOLDER_EVAL_SPLIT
    train, evaluation = _folder_splits(data_cfg.data_dir, train_name, eval_name)
  elif source == 'tfds':
    eval_name = data_cfg.eval_split or _TFDS_EVAL_SPLIT
    train, evaluation = _tfds_splits(data_cfg.data_dir, train_name, eval_name)
  else:
    raise DataError(
        f'Unknown data.source={source!r} for cityscapes; use one of '
        f'{", ".join(SOURCES)}.'
    )
  train, evaluation = _capped(train, num_train), _capped(evaluation, num_test)
  native = size is None
  if size is None:
    image_name, image_src, _, _ = train.read(0)
    size = _image_size_of(image_src, image_name)
  return CityscapesDataset(
      name=NAME,
      num_classes=NUM_CLASSES,
      mean=mean,
      std=std,
      test_split_name=eval_name,
      image_shape=(size[0], size[1], 3),
      augmentation=augmentation,
      ignore_label=ignore_label,
      num_threads=num_threads,
      train_split=train,
      eval_split=evaluation,
      decoder=_Decoder(size, native, ignore_label),
  )


def _capped(split: _Split, cap: int) -> _Split:
  """The first `cap` frames of `split` (all where cap is 0)."""
  if not cap or cap >= split.size:
    return split
  return dataclasses.replace(split, size=cap)


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def frame_size(value: Any) -> Optional[Tuple[int, int]]:
  """`(height, width)` of data.image_size, or None for the frames' own
  (`NATIVE_SIZE` for the official frames)."""
  if value is None or (_is_int(value) and value == 0):
    return None
  if _is_int(value) and value > 0:
    return int(value), _WIDTH_PER_HEIGHT * int(value)
  if (
      isinstance(value, (tuple, list))
      and len(value) == 2
      and all(_is_int(v) and v > 0 for v in value)
  ):
    return int(value[0]), int(value[1])
  raise ConfigError(
      f'data.image_size={value!r} must be a positive int s (s x 2s frames), '
      "a (height, width) pair, or 0 for the frames' own size."
  )


def _ignore_label(value: Any) -> int:
  if not _is_int(value) or 0 <= value < NUM_CLASSES:
    raise ConfigError(
        f'data.ignore_label={value!r} must be an int outside the train ids '
        f'0..{NUM_CLASSES - 1} (255 by default).'
    )
  return int(value)


def _count(data_cfg: ml_collections.ConfigDict, key: str) -> int:
  value = data_cfg[key]
  if value is None:
    return 0
  if not _is_int(value) or value < 0:
    raise ConfigError(f'data.{key}={value!r} must be a non-negative integer.')
  return int(value)


def _num_threads(value: Any) -> int:
  # None, or tf.data's AUTOTUNE (-1) where a config was written for it.
  if value is None or (_is_int(value) and value == -1):
    return min(_MAX_THREADS, os.cpu_count() or 1)
  if not _is_int(value) or value < 1:
    raise ConfigError(
        f'data.num_parallel_calls={value!r} must be a positive int or None.'
    )
  return int(value)


def _stats(
    data_cfg: ml_collections.ConfigDict, key: str, default: Sequence[float]
) -> Tuple[float, ...]:
  value = data_cfg[key]
  if value is None:
    return tuple(default)
  try:
    stats = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    stats = ()
  if len(stats) != 3 or (key == 'std' and min(stats) <= 0):
    raise ConfigError(
        f'data.{key}={value!r} must be 3 numbers (one per channel)'
        + (', all positive.' if key == 'std' else '.')
    )
  return stats


# ----------------------------------------------------------------------------
# folder: the extracted official archives.


def _folder_splits(
    data_dir: Optional[str], train_name: str, eval_name: str
) -> Tuple[_Split, _Split]:
  if not data_dir or not os.path.isdir(data_dir):
    raise DataError(
        f'data.data_dir={data_dir!r} is no folder; set it to the folder '
        f'holding the extracted {_IMAGES}/ and {_LABELS}/ of Cityscapes.'
    )
  for sub, archive in zip((_IMAGES, _LABELS), _TFDS_ZIPS):
    if not os.path.isdir(os.path.join(data_dir, sub)):
      raise DataError(
          f'{data_dir} has no {sub}/ folder; extract {archive} from '
          f'{_DOWNLOAD_URL} into it.'
      )
  return (
      _folder_split(data_dir, train_name),
      _folder_split(data_dir, eval_name),
  )


def _folder_split(data_dir: str, split: str) -> _Split:
  """The frames of `split`, each image paired with its labelIds file."""
  image_dir = os.path.join(data_dir, _IMAGES, split)
  if not os.path.isdir(image_dir):
    raise DataError(
        f'{image_dir} does not exist; set data.train_split / data.eval_split '
        'to a split of the extracted archives (train, val).'
    )
  images: List[str] = []
  with os.scandir(image_dir) as entries:
    cities = sorted(e.name for e in entries if e.is_dir())
  for city in cities:
    city_dir = os.path.join(image_dir, city)
    with os.scandir(city_dir) as entries:
      names = sorted(
          e.name
          for e in entries
          if e.is_file() and e.name.endswith(_IMAGE_SUFFIX)
      )
    images.extend(os.path.join(city_dir, n) for n in names)
  if not images:
    raise DataError(
        f'{image_dir} holds no <city>/*{_IMAGE_SUFFIX} images; re-extract '
        f'{_TFDS_ZIPS[0]} into {data_dir}.'
    )
  label_dir = os.path.join(data_dir, _LABELS, split)
  labels = [
      os.path.join(
          label_dir,
          os.path.relpath(p, image_dir)[: -len(_IMAGE_SUFFIX)] + _LABEL_SUFFIX,
      )
      for p in images
  ]
  missing = [p for p in labels if not os.path.isfile(p)]
  if missing:
    raise DataError(
        f'{len(missing)} of the {len(images)} images in {image_dir} have no '
        f'labelIds file (the first: {missing[0]}); extract {_TFDS_ZIPS[1]} '
        f'into {data_dir}.'
    )
  frames = list(zip(images, labels))

  def read(index: int) -> Tuple[str, _Encoded, str, _Encoded]:
    image, label = frames[index]
    return image, image, label, label

  return _Split(split, len(frames), read)


# ----------------------------------------------------------------------------
# tfds: TFDS's cityscapes/semantic_segmentation as array_record.


def _import_tfds() -> Any:
  """The tensorflow_datasets module, TensorFlow's GPUs hidden; DataError
  where it is missing."""
  try:
    import importlib.resources  # pylint: disable=g-import-not-at-top
    import importlib.resources.abc  # noqa: F401  pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    try:
      import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      # TFDS (4.9.10) imports the importlib_resources backport when it
      # prepares a dataset but requires it only on Python < 3.9; the
      # standard library's importlib.resources is what it backports.
      sys.modules['importlib_resources'] = importlib.resources
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f"data.source='tfds' needs TensorFlow Datasets ({e}); {_INSTALL} or "
        "use data.source='folder'."
    ) from e
  # TF only feeds data: hide the GPUs, which JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # Already initialised (and hidden) earlier.
  return tfds


def _tfds_splits(
    data_dir: Optional[str], train_name: str, eval_name: str
) -> Tuple[_Split, _Split]:
  tfds = _import_tfds()
  root = data_dir or os.path.expanduser(tfds.core.constants.DATA_DIR)
  manual_dir = os.path.join(root, 'downloads', 'manual')
  try:
    builder = tfds.builder(
        _TFDS_NAME, data_dir=root, file_format='array_record'
    )
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises many types for unreadable folders and bad versions.
    raise DataError(
        f'TensorFlow Datasets cannot open {_TFDS_NAME} in data_dir={root!r} '
        f'({type(e).__name__}: {_first_line(e)}); check data.data_dir.'
    ) from e
  if not builder.is_prepared():
    missing = [
        z for z in _TFDS_ZIPS if not os.path.isfile(os.path.join(manual_dir, z))
    ]
    if missing:
      raise DataError(
          f'{_TFDS_NAME} is not prepared in {root} and {manual_dir} lacks '
          f'{" and ".join(missing)}; download {" and ".join(_TFDS_ZIPS)} from '
          f'{_DOWNLOAD_URL} into {manual_dir}.'
      )
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=manual_dir, try_download_gcs=False
          )
      )
    except Exception as e:  # pylint: disable=broad-except
      # Truncated zips, a full disk, a foreign layout: all mean no data.
      raise DataError(
          f'TensorFlow Datasets could not prepare {_TFDS_NAME} from the zips '
          f'in {manual_dir} ({type(e).__name__}: {_first_line(e)}); '
          f'replace them with the ones from {_DOWNLOAD_URL}.'
      ) from e
  return (
      _tfds_split(tfds, builder, train_name),
      _tfds_split(tfds, builder, eval_name),
  )


def _tfds_split(tfds: Any, builder: Any, split: str) -> _Split:
  if split not in builder.info.splits:
    raise DataError(
        f'{_TFDS_NAME} in {builder.data_dir} has no split {split!r} (it has '
        f'{", ".join(builder.info.splits)}); set data.train_split / '
        'data.eval_split.'
    )
  # Random access by index is what makes batches a function of (seed,
  # step); images stay PNG bytes here and are decoded as the folder's are.
  skip = tfds.decode.SkipDecoding()
  try:
    source = builder.as_data_source(
        split, decoders={'image_left': skip, 'segmentation_label': skip}
    )
  except (NotImplementedError, ValueError) as e:
    raise DataError(
        f'{_TFDS_NAME} in {builder.data_dir} is not stored as array_record, '
        'which random access needs; move that folder away to have it '
        'prepared again, or convert it with `tfds convert_format '
        '--out_file_format=array_record`.'
    ) from e
  lock = threading.Lock()  # one reader of the record files at a time
  prefix = f'{_TFDS_NAME}/{split}'

  def read(index: int) -> Tuple[str, _Encoded, str, _Encoded]:
    with lock:
      example = source[index]
    image_id = example['image_id']
    if isinstance(image_id, bytes):
      image_id = image_id.decode('utf-8', 'replace')
    name = f'{prefix}[{index}] ({image_id})'
    return (
        f'{name} image_left',
        example['image_left'],
        f'{name} segmentation_label',
        example['segmentation_label'],
    )

  return _Split(split, len(source), read)


def _first_line(error: Exception) -> str:
  return str(error).strip().split('\n', 1)[0]
