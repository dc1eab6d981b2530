"""Tests for gaternet_jax.data: every source, on tiny datasets built here."""

import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from gaternet_jax import data
from gaternet_jax.errors import DataError

# Sorted, these are the CIFAR-10 label names in label order.
CIFAR10_CLASSES = (
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
)


def _cfg(**kwargs):
  return ConfigDict(kwargs)


# ----------------------------------------------------------------------------
# digits


@pytest.fixture(scope='module')
def digits():
  return data.load_dataset(_cfg(name='digits', source='builtin'))


def test_digits_shapes_and_split(digits):
  assert isinstance(digits, data.InMemoryDataset)
  assert digits.name == 'digits'
  assert digits.num_classes == 10
  assert digits.test_split_name == 'test'
  assert digits.train_images.shape == (1437, 8, 8, 1)
  assert digits.test_images.shape == (360, 8, 8, 1)
  assert digits.train_images.dtype == np.uint8
  assert digits.train_labels.shape == (1437,)
  assert digits.test_labels.shape == (360,)
  assert digits.train_labels.dtype == np.int32
  assert digits.test_labels.dtype == np.int32
  for labels in (digits.train_labels, digits.test_labels):
    assert labels.min() == 0 and labels.max() == 9
  # Stratified: every class keeps ~20% of its images in test.
  assert np.all(np.abs(np.bincount(digits.test_labels) - 36) <= 1)


def test_digits_pixels_scaled_from_0_16(digits):
  allowed = {round(v * 255 / 16) for v in range(17)}
  assert set(np.unique(digits.train_images).tolist()) <= allowed
  assert digits.train_images.max() == 255
  # The split holds every sklearn digit exactly once.
  from sklearn import datasets as sk_datasets

  raw = sk_datasets.load_digits()
  expected = np.round(raw.images * 255 / 16).astype(np.uint8)
  ours = np.concatenate([digits.train_images, digits.test_images])[..., 0]
  assert sorted(map(bytes, ours)) == sorted(map(bytes, expected))


def test_digits_deterministic(digits):
  again = data.load_dataset(_cfg(name='digits'))
  np.testing.assert_array_equal(again.train_images, digits.train_images)
  np.testing.assert_array_equal(again.train_labels, digits.train_labels)
  np.testing.assert_array_equal(again.test_images, digits.test_images)
  np.testing.assert_array_equal(again.test_labels, digits.test_labels)


def test_digits_mean_std_computed(digits):
  x = digits.train_images.astype(np.float64) / 255
  assert len(digits.mean) == len(digits.std) == 1
  np.testing.assert_allclose(digits.mean, [x.mean()], rtol=1e-12)
  np.testing.assert_allclose(digits.std, [x.std()], rtol=1e-12)


def test_given_mean_std_are_used():
  ds = data.load_dataset(_cfg(name='digits', mean=(0.5,), std=(0.25,)))
  assert ds.mean == (0.5,) and ds.std == (0.25,)
  with pytest.raises(DataError, match='channels'):
    data.load_dataset(_cfg(name='digits', mean=(0.5, 0.5, 0.5)))


def test_num_examples_caps(digits):
  ds = data.load_dataset(
      _cfg(name='digits', num_train_examples=100, num_test_examples=30)
  )
  np.testing.assert_array_equal(ds.train_images, digits.train_images[:100])
  np.testing.assert_array_equal(ds.train_labels, digits.train_labels[:100])
  np.testing.assert_array_equal(ds.test_images, digits.test_images[:30])
  np.testing.assert_array_equal(ds.test_labels, digits.test_labels[:30])
  # Statistics describe the capped train split.
  x = ds.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-12)
  full = data.load_dataset(
      _cfg(name='digits', num_train_examples=None, num_test_examples=0)
  )
  assert len(full.train_labels) == 1437 and len(full.test_labels) == 360
  with pytest.raises(DataError, match='num_train_examples'):
    data.load_dataset(_cfg(name='digits', num_train_examples=-1))


def test_unknown_name_and_source():
  with pytest.raises(DataError, match='mnist'):
    data.load_dataset(_cfg(name='mnist'))
  with pytest.raises(DataError, match='hdf5'):
    data.load_dataset(_cfg(name='cifar10', source='hdf5', data_dir='/x'))


# ----------------------------------------------------------------------------
# folder


def _write_tree(root, classes=CIFAR10_CLASSES, n_train=3, n_test=2, size=32):
  """Writes train/<class>/* and test/<class>/* under `root`.

  Image k of a split/class is k.png (random pixels, exact) when k is even and
  k.jpg (one flat colour, lossy) when odd; train/<class>/0.png is grayscale.

  Returns:
    {split: [(class, file name, expected (size, size, 3) uint8 or None)]}
    in the order the loader must produce; None marks a JPEG.
  """
  rng = np.random.default_rng(0)
  expected = {}
  # Reversed, so the loader cannot rely on creation order.
  for split, n in (('train', n_train), ('test', n_test)):
    entries = []
    for cls in sorted(classes, reverse=True):
      folder = root / split / cls
      folder.mkdir(parents=True)
      for k in range(n):
        if k % 2 == 0:
          if split == 'train' and k == 0:
            gray = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(gray, 'L').save(folder / f'{k}.png')
            pixels = np.repeat(gray[..., None], 3, axis=-1)
          else:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f'{k}.png')
          entries.append((cls, f'{k}.png', pixels))
        else:
          colour = tuple(int(c) for c in rng.integers(0, 256, 3))
          Image.new('RGB', (size, size), colour).save(
              folder / f'{k}.jpg', quality=95
          )
          entries.append((cls, f'{k}.jpg', np.full((size, size, 3), colour)))
    expected[split] = sorted(entries, key=lambda e: (e[0], e[1]))
  return expected


def _check_split(images, labels, entries, classes):
  assert images.shape == (len(entries), 32, 32, 3)
  assert images.dtype == np.uint8 and labels.dtype == np.int32
  names = sorted(classes)
  np.testing.assert_array_equal(
      labels, [names.index(cls) for cls, _, _ in entries]
  )
  for image, (cls, fname, pixels) in zip(images, entries):
    if fname.endswith('.png'):
      np.testing.assert_array_equal(image, pixels, err_msg=f'{cls}/{fname}')
    else:
      diff = np.abs(image.astype(int) - pixels)
      assert diff.max() <= 3, f'{cls}/{fname}'


def _make_tar(tmp_path, root, name, top=None, mode='w:gz'):
  archive = tmp_path / name
  with tarfile.open(archive, mode) as tar:
    for split in ('train', 'test'):
      arcname = f'{top}/{split}' if top else split
      tar.add(root / split, arcname=arcname)
  return archive


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / 'cifar_folder'
  return root, _write_tree(root)


def _load_folder(path, name='cifar10'):
  return data.load_dataset(_cfg(name=name, source='folder', data_dir=str(path)))


def test_folder_directory(tree):
  root, expected = tree
  ds = _load_folder(root)
  assert ds.num_classes == 10 and ds.test_split_name == 'test'
  _check_split(
      ds.train_images, ds.train_labels, expected['train'], CIFAR10_CLASSES
  )
  _check_split(
      ds.test_images, ds.test_labels, expected['test'], CIFAR10_CLASSES
  )
  x = ds.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-12)


@pytest.mark.parametrize(
    'name,top,mode',
    [
        ('flat.tar.gz', None, 'w:gz'),
        ('nested.tgz', 'cifar10', 'w:gz'),
        ('nested.tar', 'some_folder', 'w'),
    ],
)
def test_folder_tar_matches_directory(tmp_path, tree, name, top, mode):
  root, expected = tree
  ds = _load_folder(_make_tar(tmp_path, root, name, top, mode))
  _check_split(
      ds.train_images, ds.train_labels, expected['train'], CIFAR10_CLASSES
  )
  _check_split(
      ds.test_images, ds.test_labels, expected['test'], CIFAR10_CLASSES
  )
  from_dir = _load_folder(root)
  np.testing.assert_array_equal(ds.train_images, from_dir.train_images)
  np.testing.assert_array_equal(ds.test_images, from_dir.test_images)


def test_folder_ignores_hidden_and_non_image_files(tree):
  root, expected = tree
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'cat' / '._0.png').write_bytes(b'macOS resource fork')
  (root / 'train' / '.cache').mkdir()
  ds = _load_folder(root)
  assert len(ds.train_labels) == len(expected['train'])


def test_folder_missing_path(tmp_path):
  missing = tmp_path / 'nowhere'
  with pytest.raises(DataError, match='nowhere.*does not exist'):
    _load_folder(missing)
  with pytest.raises(DataError, match='data_dir'):
    data.load_dataset(_cfg(name='cifar10', source='folder'))


def test_folder_empty_or_no_test_split(tmp_path, tree):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(DataError, match='no train/ subfolder'):
    _load_folder(empty)
  root, _ = tree
  for child in (root / 'test').iterdir():
    for f in child.iterdir():
      f.unlink()
    child.rmdir()
  (root / 'test').rmdir()
  with pytest.raises(DataError, match='no test/ subfolder'):
    _load_folder(root)


def test_folder_empty_class(tree):
  root, _ = tree
  for f in (root / 'test' / 'dog').iterdir():
    f.unlink()
  with pytest.raises(DataError, match='test/dog/ holds no'):
    _load_folder(root)


def test_folder_corrupted_image_is_named(tmp_path, tree):
  root, _ = tree
  (root / 'train' / 'frog' / '2.png').write_bytes(b'\x89PNG garbage')
  with pytest.raises(DataError, match=r'train[/\\]frog[/\\]2\.png'):
    _load_folder(root)
  archive = _make_tar(tmp_path, root, 'bad.tar.gz', top='top')
  with pytest.raises(DataError, match=r'top/train/frog/2\.png'):
    _load_folder(archive)


def test_folder_truncated_jpeg_is_named(tree):
  root, _ = tree
  path = root / 'test' / 'ship' / '1.jpg'
  path.write_bytes(path.read_bytes()[:200])
  with pytest.raises(DataError, match=r'ship[/\\]1\.jpg'):
    _load_folder(root)


def test_folder_mismatched_classes(tree):
  root, _ = tree
  (root / 'test' / 'truck').rename(root / 'test' / 'lorry')
  with pytest.raises(DataError, match='different class folders') as info:
    _load_folder(root)
  assert 'truck' in str(info.value) and 'lorry' in str(info.value)


def test_folder_wrong_class_count(tmp_path, tree):
  root, _ = tree
  with pytest.raises(DataError, match='10 class folders but cifar100'):
    _load_folder(root, name='cifar100')
  small = tmp_path / 'three'
  _write_tree(small, classes=('a', 'b', 'c'))
  with pytest.raises(DataError, match='3 class folders but cifar10 has 10'):
    _load_folder(small)


def test_folder_mixed_shapes(tree):
  root, _ = tree
  Image.new('RGB', (16, 16)).save(root / 'test' / 'bird' / '0.png')
  with pytest.raises(DataError, match='one shape') as info:
    _load_folder(root)
  assert '16x16x3' in str(info.value) and 'bird' in str(info.value)


def test_folder_not_an_archive(tmp_path):
  path = tmp_path / 'data.tar.gz'
  path.write_bytes(b'this is not a tarball')
  with pytest.raises(DataError, match='readable tar archive'):
    _load_folder(path)


# ----------------------------------------------------------------------------
# python_archive


def _batch_pickle(batch, py2_names=True):
  """Pickles like the official files: protocol 2, bytes keys."""
  blob = pickle.dumps(batch, protocol=2)
  if py2_names:
    # The official files were written by numpy 1 under Python 2.
    blob = blob.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
  return blob


def _fake_batches(label_keys, sizes, num_classes, seed=0):
  """[(batch dict, (n, 32, 32, 3) expected images, labels)] of given sizes."""
  rng = np.random.default_rng(seed)
  out = []
  for n in sizes:
    flat = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n)
    batch = {
        b'batch_label': b'fake',
        b'filenames': [b'x.png'] * n,
        b'data': flat,
    }
    for k, key in enumerate(label_keys):
      # Only the first key ('labels' / 'fine_labels') holds the real labels.
      batch[key] = [int(v) for v in (labels if k == 0 else labels // 5)]
    # CHW-flattened rows, built by hand rather than by the loader's reshape.
    images = np.empty((n, 32, 32, 3), np.uint8)
    for c in range(3):
      for y in range(32):
        images[:, y, :, c] = flat[:, c * 1024 + y * 32 : c * 1024 + y * 32 + 32]
    out.append((batch, images, labels))
  return out


def _write_archive(path, folder, members):
  """A tar.gz holding folder/<name> for each (name, bytes)."""
  with tarfile.open(path, 'w:gz') as tar:
    for name, blob in members:
      info = tarfile.TarInfo(f'{folder}/{name}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return path


CIFAR10_FILES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']


@pytest.fixture
def cifar10_archive(tmp_path):
  """(path, train images, train labels, test images, test labels)."""
  batches = _fake_batches([b'labels'], [4, 4, 4, 4, 4, 3], 10)
  members = [
      (name, _batch_pickle(b[0])) for name, b in zip(CIFAR10_FILES, batches)
  ]
  members.append(('batches.meta', pickle.dumps({b'label_names': []}, 2)))
  path = _write_archive(
      tmp_path / 'cifar-10-python.tar.gz', 'cifar-10-batches-py', members
  )
  train = batches[:5]
  return (
      path,
      np.concatenate([b[1] for b in train]),
      np.concatenate([b[2] for b in train]),
      batches[5][1],
      batches[5][2],
  )


def _load_archive(path, name='cifar10', **kwargs):
  return data.load_dataset(
      _cfg(name=name, source='python_archive', data_dir=str(path), **kwargs)
  )


def test_python_archive_cifar10(cifar10_archive):
  path, x_train, y_train, x_test, y_test = cifar10_archive
  ds = _load_archive(path)
  assert ds.train_images.shape == (20, 32, 32, 3)
  assert ds.test_images.shape == (3, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images, x_train)
  np.testing.assert_array_equal(ds.train_labels, y_train)
  np.testing.assert_array_equal(ds.test_images, x_test)
  np.testing.assert_array_equal(ds.test_labels, y_test)
  assert ds.num_classes == 10 and ds.test_split_name == 'test'
  # Also from the folder holding the archive.
  again = _load_archive(path.parent)
  np.testing.assert_array_equal(again.train_images, x_train)


def test_python_archive_extracted_folder(tmp_path, cifar10_archive):
  path, x_train, y_train, x_test, _ = cifar10_archive
  out = tmp_path / 'extracted'
  with tarfile.open(path) as tar:
    for member in tar:
      target = out / member.name
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(tar.extractfile(member).read())
  path.unlink()
  for data_dir in (out, out / 'cifar-10-batches-py'):
    ds = _load_archive(data_dir)
    np.testing.assert_array_equal(ds.train_images, x_train)
    np.testing.assert_array_equal(ds.train_labels, y_train)
    np.testing.assert_array_equal(ds.test_images, x_test)
  (out / 'cifar-10-batches-py' / 'data_batch_3').unlink()
  with pytest.raises(DataError, match='data_batch_3'):
    _load_archive(out)


def test_python_archive_py3_pickles(tmp_path):
  # Pickles written by numpy 2 / Python 3 name numpy._core and _codecs.
  batches = _fake_batches([b'labels'], [2] * 6, 10, seed=1)
  members = [
      (name, _batch_pickle(b[0], py2_names=False))
      for name, b in zip(CIFAR10_FILES, batches)
  ]
  path = _write_archive(tmp_path / 'c10.tar.gz', 'cifar-10-batches-py', members)
  ds = _load_archive(path)
  np.testing.assert_array_equal(ds.test_images, batches[5][1])


def test_python_archive_cifar100_fine_labels(tmp_path):
  batches = _fake_batches([b'fine_labels', b'coarse_labels'], [6, 4], 100)
  members = [
      ('train', _batch_pickle(batches[0][0])),
      ('test', _batch_pickle(batches[1][0])),
      ('meta', pickle.dumps({b'fine_label_names': []}, 2)),
  ]
  path = _write_archive(
      tmp_path / 'cifar-100-python.tar.gz', 'cifar-100-python', members
  )
  ds = _load_archive(path, name='cifar100')
  assert ds.num_classes == 100
  np.testing.assert_array_equal(ds.train_images, batches[0][1])
  np.testing.assert_array_equal(ds.train_labels, batches[0][2])
  np.testing.assert_array_equal(ds.test_images, batches[1][1])
  np.testing.assert_array_equal(ds.test_labels, batches[1][2])
  # A CIFAR-10 loader finds none of its batches here.
  with pytest.raises(DataError, match='data_batch_1'):
    _load_archive(path, name='cifar10')


class _Exploit:
  """Unpickling this runs a shell command, unless the unpickler refuses."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_python_archive_refuses_malicious_pickle(tmp_path):
  marker = tmp_path / 'pwned'
  evil = {b'data': _Exploit(marker), b'labels': [0]}
  members = [(name, pickle.dumps(evil, protocol=2)) for name in CIFAR10_FILES]
  path = _write_archive(
      tmp_path / 'cifar-10-python.tar.gz', 'cifar-10-batches-py', members
  )
  with pytest.raises(DataError, match='Refusing to load (posix|os|nt).system'):
    _load_archive(path)
  assert not marker.exists()
  # Sanity check of the exploit itself: a plain unpickler does run it.
  pickle.loads(pickle.dumps(_Exploit(marker)))
  assert marker.exists()


def test_python_archive_refuses_other_callables(tmp_path):
  blob = pickle.dumps(
      {b'data': np.zeros((1, 3072), np.uint8), b'labels': [0], b'x': eval},
      protocol=2,
  )
  members = [(name, blob) for name in CIFAR10_FILES]
  path = _write_archive(tmp_path / 'c.tar.gz', 'cifar-10-batches-py', members)
  with pytest.raises(DataError, match=r'(builtins|__builtin__)\.eval'):
    _load_archive(path)


def test_python_archive_truncated(tmp_path, cifar10_archive):
  path = cifar10_archive[0]
  blob = path.read_bytes()
  cut = tmp_path / 'cut' / 'cifar-10-python.tar.gz'
  cut.parent.mkdir()
  cut.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(DataError, match='truncated'):
    _load_archive(cut)


def test_python_archive_truncated_or_foreign_pickle(tmp_path):
  good = _batch_pickle(_fake_batches([b'labels'], [4], 10)[0][0])
  for i, blob in enumerate(
      [
          good[: len(good) // 2],
          pickle.dumps([1, 2, 3], protocol=2),
          pickle.dumps({b'data': [1], b'labels': [0]}, 2),
      ]
  ):
    members = [
        (name, blob if name == 'data_batch_2' else good)
        for name in CIFAR10_FILES
    ]
    path = _write_archive(
        tmp_path / f'c{i}.tar.gz', 'cifar-10-batches-py', members
    )
    with pytest.raises(DataError, match='data_batch_2'):
      _load_archive(path)


def test_python_archive_label_out_of_range(tmp_path):
  batch, _, _ = _fake_batches([b'labels'], [4], 10)[0]
  batch[b'labels'] = [0, 1, 2, 10]
  members = [(name, _batch_pickle(batch)) for name in CIFAR10_FILES]
  path = _write_archive(tmp_path / 'c.tar.gz', 'cifar-10-batches-py', members)
  with pytest.raises(DataError, match='10 classes'):
    _load_archive(path)


# ----------------------------------------------------------------------------
# validation hold-out


def test_validation_holdout(cifar10_archive):
  _, x_train, y_train, _, _ = cifar10_archive
  path = cifar10_archive[0]
  ds = _load_archive(path, validation_holdout=5)
  assert ds.test_split_name == 'validation'
  assert ds.train_images.shape == (15, 32, 32, 3)
  assert ds.test_images.shape == (5, 32, 32, 3)
  index = {x.tobytes(): i for i, x in enumerate(x_train)}
  assert len(index) == 20  # random images: all distinct
  kept = [index[x.tobytes()] for x in ds.train_images]
  held = [index[x.tobytes()] for x in ds.test_images]
  assert sorted(kept + held) == list(range(20))  # disjoint, all used
  assert kept == sorted(kept) and held == sorted(held)  # order kept
  np.testing.assert_array_equal(ds.train_labels, y_train[kept])
  np.testing.assert_array_equal(ds.test_labels, y_train[held])
  # The choice is np.random.default_rng(seed).permutation's first 5.
  np.testing.assert_array_equal(
      held, np.sort(np.random.default_rng(0).permutation(20)[:5])
  )
  again = _load_archive(path, validation_holdout=5)
  np.testing.assert_array_equal(again.test_images, ds.test_images)
  np.testing.assert_array_equal(again.train_images, ds.train_images)
  other = _load_archive(path, validation_holdout=5, holdout_seed=1)
  assert not np.array_equal(other.test_images, ds.test_images)
  # Mean/std describe the remaining 15 training images.
  x = ds.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)


def test_validation_holdout_then_caps(digits):
  ds = data.load_dataset(
      _cfg(
          name='digits',
          validation_holdout=300,
          num_train_examples=50,
          num_test_examples=20,
      )
  )
  full = data.load_dataset(_cfg(name='digits', validation_holdout=300))
  assert full.train_images.shape[0] == 1137
  assert full.test_images.shape[0] == 300
  np.testing.assert_array_equal(ds.train_images, full.train_images[:50])
  np.testing.assert_array_equal(ds.test_images, full.test_images[:20])


def test_validation_holdout_too_large(cifar10_archive):
  path = cifar10_archive[0]
  assert len(_load_archive(path, validation_holdout=19).train_labels) == 1
  with pytest.raises(DataError, match='validation_holdout=20'):
    _load_archive(path, validation_holdout=20)


# ----------------------------------------------------------------------------
# tfds


def test_tfds_missing_gives_install_hint(monkeypatch):
  # A None entry in sys.modules makes the import raise ImportError.
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(
      DataError, match='pip install tensorflow-cpu ' 'tensorflow-datasets'
  ):
    data.load_dataset(_cfg(name='cifar10', source='tfds'))


def test_import_does_not_need_tensorflow():
  code = (
      'import sys, gaternet_jax.data; '
      'assert "tensorflow" not in sys.modules; '
      'assert "tensorflow_datasets" not in sys.modules'
  )
  subprocess.run([sys.executable, '-c', code], check=True)


def test_tfds_cifar10_mock():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(_cfg(name='cifar10', source='tfds', data_dir=None))
  assert ds.train_images.shape == (6, 32, 32, 3)
  assert ds.test_images.shape == (6, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.train_labels.min() >= 0 and ds.train_labels.max() < 10
  assert ds.num_classes == 10 and len(ds.mean) == 3


def test_fake_dataset_and_dataset_info():
  dataset_info = data.dataset_info
  cfg = ConfigDict(
      dict(
          name='fake',
          image_size=32,
          num_classes=7,
          num_train_examples=100,
          num_test_examples=10,
      )
  )
  assert dataset_info(cfg) == ((32, 32, 3), 7)
  assert dataset_info(
      ConfigDict(dict(name='imagenet2012', image_size=299))
  ) == ((299, 299, 3), 1000)
  assert dataset_info(ConfigDict(dict(name='cifar100'))) == ((32, 32, 3), 100)
  ds = data.load_dataset(cfg)
  a = next(ds.train_batches(8, seed=3, start_step=5))
  it = ds.train_batches(8, seed=3)
  b = [next(it) for _ in range(6)][-1]
  np.testing.assert_array_equal(a['image'], b['image'])  # resumable
  assert a['image'].shape == (8, 32, 32, 3) and a['image'].dtype == np.uint8
  assert a['label'].max() < 7
  masks = [e['mask'] for e in ds.eval_batches(4)]
  assert len(masks) == 3 and sum(m.sum() for m in masks) == 10
  with pytest.raises(DataError):
    dataset_info(ConfigDict(dict(name='mnist')))


@pytest.mark.parametrize('seed,test_size', [(0, 0.2), (3, 0.25), (7, 0.1)])
def test_stratified_split_is_scikit_learns(seed, test_size):
  # The digits split is drawn without importing scikit-learn (seconds a
  # process); it must be scikit-learn's split, draw for draw.
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for labels in (data._load_digits()[0][1], rng.integers(0, 7, 503)):
    index = np.arange(len(labels))
    want_train, want_test = model_selection.train_test_split(
        index, test_size=test_size, random_state=seed, stratify=labels
    )
    train, test = data.stratified_split(labels, test_size, seed)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(test, want_test)
