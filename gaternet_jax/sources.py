"""Finding a dataset's images on storage, for in-memory and streamed datasets.

Both kinds of dataset (data.py's arrays, input_pipeline.py's tf.data
streams) read the same two layouts, through the functions here:
  image folders  `<split>/<class>/<image>` on a local disk or gs://
                 (`scan_image_folder`, then `label_files`);
  TFDS           a TensorFlow Datasets builder, checked before any read
                 (`tfds_builder`).

TensorFlow (Datasets) is imported only inside `tfds_builder`, so the package
imports without it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from gaternet_jax import paths
from gaternet_jax.errors import DataError

__all__ = [
    'IMAGE_EXTENSIONS',
    'hide_accelerators',
    'is_image_name',
    'label_files',
    'scan_image_folder',
    'tfds_builder',
]

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
_INSTALL = 'run `pip install tensorflow-cpu tensorflow-datasets`'


# ----------------------------------------------------------------------------
# Image folders.


def is_image_name(name: str) -> bool:
  """Whether a file name is an image's (hidden files never are)."""
  # Hidden files include macOS '._x.png' resource forks, which are no images.
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_image_folder(split_dir: str) -> Dict[str, List[str]]:
  """The class folders of `split_dir` and the images in each.

  Args:
    split_dir: a local folder or a gs:// one (read through epath) holding
      `<class>/<image>` files.

  Returns:
    {class folder name: image paths}, classes and paths in sorted order;
    hidden folders and files, and files that are no images, are left out.
  """
  if paths.is_remote(split_dir):
    root = paths.resolve(split_dir)
    classes = sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith('.')
    )
    return {
        cls: sorted(
            str(f)
            for f in (root / cls).iterdir()
            if is_image_name(f.name) and not f.is_dir()
        )
        for cls in classes
    }
  # os.scandir: no stat per file on a local disk.
  with os.scandir(split_dir) as entries:
    classes = sorted(
        e.name for e in entries if e.is_dir() and not e.name.startswith('.')
    )
  tree = {}
  for cls in classes:
    with os.scandir(os.path.join(split_dir, cls)) as entries:
      names = sorted(
          e.name for e in entries if e.is_file() and is_image_name(e.name)
      )
    tree[cls] = [os.path.join(split_dir, cls, n) for n in names]
  return tree


def label_files(
    tree: Mapping[str, Sequence[Any]], classes: Sequence[str]
) -> Tuple[List[Any], List[int]]:
  """The files of a split with their labels.

  Args:
    tree: {class name: that class's files (paths, or anything naming a
      file)}, e.g. from `scan_image_folder`.
    classes: the dataset's classes; class `classes[i]` has label i. Every
      class of `tree` must be one of them (the callers check, with their
      own messages); classes without files add nothing.

  Returns:
    (files, labels): the files class by class in `classes` order, each
    class's in its `tree` order, and their int labels.
  """
  files, labels = [], []
  for label, cls in enumerate(classes):
    class_files = tree.get(cls, ())
    files.extend(class_files)
    labels.extend([label] * len(class_files))
  return files, labels


# ----------------------------------------------------------------------------
# TensorFlow Datasets.


def hide_accelerators(tf):
  """Hides the GPUs from TensorFlow, which only feeds data: otherwise it
  would reserve GPU memory that JAX needs."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):
    pass  # TF's devices were already initialised (and hidden) earlier.


def tfds_builder(
    name: str,
    data_dir: Optional[str],
    splits: Sequence[str],
    *,
    needs: str,
    alternative: str,
    hint: str,
    split_hint: str = '',
    download: bool = False,
):
  """The TFDS builder of the image classification dataset `name`, checked.

  Args:
    name: the TFDS name, e.g. 'cifar10' or 'imagenet2012'.
    data_dir: TFDS's data_dir; None or '' for its default.
    splits: the splits the caller reads; each must exist in a prepared
      dataset.
    needs: how the error begins when TFDS is not installed, e.g.
      "data.source='tfds' needs".
    alternative: what the user can use instead of TFDS, e.g.
      "use data.source='folder'".
    hint: how the user prepares the data, ending the errors about it.
    split_hint: what to do about a missing split (default: `hint`).
    download: download and prepare the dataset if it is not prepared, as
      tfds.load does (CIFAR); False makes an unprepared one an error
      (ImageNet needs its archives downloaded by hand). A dataset prepared
      here is not checked further.

  Returns:
    (the tensorflow_datasets module, the builder).

  Raises:
    DataError: TFDS is missing, or the dataset is unknown, unprepared,
      lacks a split or is no image classification dataset.
  """
  try:
    # Imported here so the package works without TensorFlow installed;
    # TFDS first, so that a missing TFDS fails before TensorFlow loads.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(
        f'{needs} TensorFlow Datasets ({e}); {_INSTALL} or ' f'{alternative}.'
    ) from e
  hide_accelerators(tf)
  data_dir = data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises many types for unknown names and unreadable folders.
    raise DataError(
        f'TensorFlow Datasets has no {name} in data_dir='
        f'{data_dir!r} ({type(e).__name__}: {_first_line(e)}); '
        f'{hint}.'
    ) from e
  if not builder.is_prepared():
    if not download:
      raise DataError(
          f'data_dir={data_dir!r} holds no prepared {name} '
          f'(looked in {builder.data_dir}); {hint}.'
      )
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      # Missing files, no network, a bad data_dir: all mean no data.
      raise DataError(
          f'TensorFlow Datasets could not load {name} from data_dir='
          f'{data_dir!r} ({type(e).__name__}: {_first_line(e)}); {hint}.'
      ) from e
    # A dataset TFDS builds itself has the splits and features of its
    # builder's code (which tfds.testing.mock_data leaves unknown): reading
    # is the check.
    return tfds, builder
  for split in splits:
    if split not in builder.info.splits:
      raise DataError(
          f'{name} in {builder.data_dir} has no split {split!r} (it has '
          f'{", ".join(builder.info.splits)}); {split_hint or hint}.'
      )
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise DataError(
        f'{name} has no image and label features; the input '
        'pipeline reads image classification datasets.'
    )
  return tfds, builder


def _first_line(error: Exception) -> str:
  return str(error).strip().split('\n', 1)[0]
