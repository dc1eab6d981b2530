"""Tests for gaternet_jax.input_pipeline on tiny image folders and TFDS dirs.

Every image is one solid colour (its "code") plus a faint texture: any crop
of it still shows the code, so the files behind augmented batches can be
identified, while the texture makes crops and flips change the pixels.
"""

import io
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

tf = pytest.importorskip('tensorflow')

# pylint: disable=g-import-not-at-top,wrong-import-position
from gaternet_jax import input_pipeline
from gaternet_jax.errors import ConfigError, DataError

# pylint: enable=g-import-not-at-top,wrong-import-position

SIZE = 24
_LEVELS = (30, 80, 130, 180, 230)
# Colour codes: gray files need equal channels, colour files get the rest.
_GRAY_CODES = [(v, v, v) for v in _LEVELS]
_COLOR_CODES = [
    c for c in itertools.product(_LEVELS, repeat=3) if len(set(c)) > 1
]


def _pixels(code, height, width, gray, seed):
  """uint8 (h, w, 3) or (h, w): the code plus a +-10 texture."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  phase = rng.uniform(0, 2 * np.pi)
  texture = 10 * np.sin(0.9 * x + 0.5 * y + phase)
  image = np.asarray(code, np.float64)[None, None, :] + texture[..., None]
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image[..., 0] if gray else image


def _encode(array, fmt, mode=None):
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buf = io.BytesIO()
  image.save(buf, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def _identify(image, codes):
  """The code whose colour the (h, w, 3) image shows."""
  mean = image.reshape(-1, 3).mean(0)
  best = min(codes, key=lambda c: np.abs(mean - c).max())
  assert np.abs(mean - best).max() < 20, (mean, best)
  return best


# (class, file name, height, width, kind) per split. Class folders are made
# in unsorted order: labels must follow the sorted names.
_TRAIN = [
    ('dog', 'd0.JPEG', 40, 60, 'rgb'),
    ('dog', 'd1.jpg', 50, 30, 'rgb'),
    ('dog', 'd2.jpeg', 33, 33, 'gray'),
    ('ant', 'a0.JPEG', 45, 70, 'rgb'),
    ('ant', 'a1.JPEG', 28, 28, 'png'),
    ('ant', 'a2.JPEG', 64, 40, 'cmyk'),
    ('ant', 'a3.png', 30, 50, 'png'),
    ('cat', 'c0.JPEG', 36, 48, 'rgb'),
    ('cat', 'c1.JPEG', 60, 44, 'rgb'),
    ('cat', 'c2.JPEG', 26, 80, 'gray'),
    ('cat', 'c3.JPEG', 40, 40, 'rgb'),
    ('cat', 'c4.JPEG', 52, 38, 'rgb'),
]
_VAL = [
    ('dog', 'v0.JPEG', 40, 50, 'rgb'),
    ('cat', 'v1.JPEG', 30, 44, 'gray'),
    ('ant', 'v2.png', 38, 38, 'png'),
    ('cat', 'v3.JPEG', 48, 36, 'rgb'),
    ('dog', 'v4.JPEG', 44, 60, 'rgb'),
    ('ant', 'v5.JPEG', 36, 40, 'rgb'),
    ('cat', 'v6.JPEG', 50, 50, 'rgb'),
]
_LABELS = {'ant': 0, 'cat': 1, 'dog': 2}


def _write_folder(root):
  """Writes train/ and val/; returns {split: {code: label}}."""
  gray, color = iter(_GRAY_CODES), iter(_COLOR_CODES[::7])
  truth = {}
  for split, items in (('train', _TRAIN), ('val', _VAL)):
    truth[split] = {}
    for i, (cls, name, h, w, kind) in enumerate(items):
      code = next(gray) if kind == 'gray' else next(color)
      folder = os.path.join(root, split, cls)
      os.makedirs(folder, exist_ok=True)
      pixels = _pixels(code, h, w, kind == 'gray', seed=i)
      if kind == 'png':  # A PNG, in a1.JPEG under a JPEG name as in ImageNet.
        data = _encode(pixels, 'PNG')
      elif kind == 'cmyk':
        data = _encode(pixels, 'JPEG', 'CMYK')
      else:
        data = _encode(pixels, 'JPEG')
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(data)
      truth[split][code] = _LABELS[cls]
  # Ignored: a macOS resource fork and a non-image.
  with open(os.path.join(root, 'train', 'cat', '._c0.JPEG'), 'wb') as f:
    f.write(b'junk')
  with open(os.path.join(root, 'train', 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image')
  return truth


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('image_folder'))
  return root, _write_folder(root)


def _cfg(root, **kwargs):
  fields = dict(
      name='image_folder', data_dir=root, image_size=SIZE, shuffle_buffer=8
  )
  fields.update(kwargs)
  return ConfigDict(fields)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _codes(batches, codes, mask=True):
  """[(code, label)] of the rows of `batches` (masked rows only)."""
  out = []
  for b in batches:
    keep = (
        b['mask'] > 0
        if mask and 'mask' in b
        else np.ones(len(b['label']), bool)
    )
    out += [
        (_identify(img, codes), int(lab))
        for img, lab in zip(b['image'][keep], b['label'][keep])
    ]
  return out


# ----------------------------------------------------------------------------
# Image folders.


def test_folder_train_shapes_labels_and_epoch(folder):
  root, truth = folder
  ds = input_pipeline.load_imagenet(
      _cfg(root), process_index=0, process_count=1
  )
  assert ds.image_shape == (SIZE, SIZE, 3)
  assert (ds.num_classes, ds.num_train_examples, ds.num_test_examples) == (
      3,
      12,
      7,
  )
  assert ds.test_split_name == 'val'
  assert ds.mean == input_pipeline.IMAGENET_MEAN
  assert ds.std == input_pipeline.IMAGENET_STD
  assert ds.steps_per_epoch(4) == 3
  batches = _take(ds.train_batches(4, seed=0), 3)
  for b in batches:
    assert set(b) == {'image', 'label'}
    assert b['image'].shape == (4, SIZE, SIZE, 3)
    assert b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32
    assert b['image'].min() < b['image'].max()
  seen = _codes(batches, list(truth['train']))
  # One epoch: every file once, with the label of its sorted class folder.
  assert sorted(c for c, _ in seen) == sorted(truth['train'])
  assert all(truth['train'][c] == label for c, label in seen)


def test_folder_eval_covers_once_padded_and_deterministic(folder):
  root, truth = folder
  ds = input_pipeline.load_imagenet(
      _cfg(root), process_index=0, process_count=1
  )
  assert ds.num_eval_batches(3) == 3
  first = list(ds.eval_batches(3))
  assert [b['mask'].tolist() for b in first] == [
      [1, 1, 1],
      [1, 1, 1],
      [1, 0, 0],
  ]
  for b in first:
    assert b['image'].shape == (3, SIZE, SIZE, 3)
    assert b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32 and b['mask'].dtype == np.float32
  assert not first[-1]['image'][1:].any()  # Padding is zeros.
  seen = _codes(first, list(truth['val']))
  assert sorted(c for c, _ in seen) == sorted(truth['val'])
  assert all(truth['val'][c] == label for c, label in seen)
  second = list(ds.eval_batches(3))
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_folder_processes_read_disjoint_shards(folder):
  root, truth = folder
  train_seen, eval_seen = [], []
  for index in range(2):
    ds = input_pipeline.load_imagenet(
        _cfg(root), process_index=index, process_count=2
    )
    assert ds.steps_per_epoch(4) == 3  # 6 files a process, 2 rows a batch.
    batches = _take(ds.train_batches(4, seed=3), 3)
    assert batches[0]['image'].shape == (2, SIZE, SIZE, 3)
    codes = [c for c, _ in _codes(batches, list(truth['train']))]
    assert len(set(codes)) == 6
    train_seen.append(set(codes))
    # Both yield ceil(4 / 2) batches: the eval step is a collective.
    evals = list(ds.eval_batches(4))
    assert len(evals) == 2
    eval_seen.append([c for c, _ in _codes(evals, list(truth['val']))])
  assert not train_seen[0] & train_seen[1]
  assert train_seen[0] | train_seen[1] == set(truth['train'])
  assert not set(eval_seen[0]) & set(eval_seen[1])
  assert sorted(eval_seen[0] + eval_seen[1]) == sorted(truth['val'])


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_folder_train_resume_matches_uninterrupted(folder):
  root, _ = folder
  ds = input_pipeline.load_imagenet(
      _cfg(root), process_index=0, process_count=1
  )
  full = _take(ds.train_batches(4, seed=5), 7)  # 3 steps per epoch.
  # Mid-epoch and at an epoch boundary.
  _assert_same_batches(
      _take(ds.train_batches(4, 5, start_step=4), 3), full[4:7]
  )
  _assert_same_batches(
      _take(ds.train_batches(4, 5, start_step=3), 2), full[3:5]
  )
  # Epochs differ in order and augmentation; seeds differ.
  assert not np.array_equal(full[0]['image'], full[3]['image'])
  other = next(ds.train_batches(4, seed=6))
  assert not np.array_equal(other['image'], full[0]['image'])


def test_folder_cache_serves_later_epochs(folder, tmp_path):
  src, truth = folder
  root = str(tmp_path / 'copy')
  shutil.copytree(src, root)
  ds = input_pipeline.load_imagenet(
      _cfg(root, cache=True), process_index=0, process_count=1
  )
  batches = ds.train_batches(4, seed=1)
  first_epoch = _take(batches, 4)
  evals = list(ds.eval_batches(4))
  for split in ('train', 'val'):
    shutil.rmtree(os.path.join(root, split))
  # The files are gone: what follows comes from the in-memory caches.
  later = _take(batches, 6)
  codes = [c for c, _ in _codes(later[2:5], list(truth['train']))]
  assert sorted(codes) == sorted(truth['train'])  # Still a full epoch.
  assert sorted(
      c for c, _ in _codes(first_epoch[:3], list(truth['train']))
  ) == sorted(truth['train'])
  for a, b in zip(evals, ds.eval_batches(4)):
    np.testing.assert_array_equal(a['image'], b['image'])


# ----------------------------------------------------------------------------
# Preprocessing geometry, on a horizontal ramp: pixel value = column.


def _ramp_png(height, width):
  ramp = np.broadcast_to(
      np.arange(width, dtype=np.uint8)[None, :, None], (height, width, 3)
  )
  return tf.constant(_encode(np.ascontiguousarray(ramp), 'PNG'))


def test_train_crop_falls_back_to_clamped_center_crop():
  # No crop of an 8x200 image has area >= 90% and aspect ratio <= 4/3.
  prep = input_pipeline.Preprocessing(image_size=16, crop_area_range=(0.9, 1.0))
  fn = input_pipeline.make_train_preprocess(prep)
  image = fn(_ramp_png(8, 200), tf.constant([1, 2], tf.int64)).numpy()
  # The central 8x11 window (columns 94..104), maybe mirrored.
  assert image.shape == (16, 16, 3)
  assert 93 <= image.min() and image.max() <= 105


def test_eval_crop_is_central_fraction():
  prep = input_pipeline.Preprocessing(image_size=32, eval_crop_fraction=0.875)
  fn = input_pipeline.make_eval_preprocess(prep)
  # Short side 40 -> 36: the central 36x36 square, columns 22..57.
  image = fn(_ramp_png(40, 80)).numpy()
  assert image.shape == (32, 32, 3)
  assert 21 <= image.min() <= 23 and 56 <= image.max() <= 58
  assert np.all(np.diff(image[0, :, 0].astype(int)) >= 0)  # Not mirrored.


# ----------------------------------------------------------------------------
# A tiny TFDS data_dir, written by a real builder and read back from disk.


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip('tensorflow_datasets')
  codes = iter(_COLOR_CODES[3::5])
  examples = {}
  for split, n in (('train', 10), ('validation', 5)):
    examples[split] = []
    for i in range(n):
      code, h, w = next(codes), 30 + 3 * i, 50 - 2 * i
      examples[split].append(
          (code, (7 * i + 3) % 1000, _pixels(code, h, w, False, seed=i))
      )

  class TinyImagenetForTest(
      tfds.core.GeneratorBasedBuilder, skip_registration=True
  ):
    """imagenet2012's features: a JPEG image, a 1000-way label, a name."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {
                  'image': tfds.features.Image(encoding_format='jpeg'),
                  'label': tfds.features.ClassLabel(num_classes=1000),
                  'file_name': tfds.features.Text(),
              }
          ),
          supervised_keys=('image', 'label'),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in examples}

    def _generate_examples(self, split):
      for i, (_, label, pixels) in enumerate(examples[split]):
        yield f'{split}_{i}', {
            'image': pixels,
            'label': label,
            'file_name': f'{split}_{i}.JPEG',
        }

  # TFDS looks for a builder's code next to its module; for a module inside
  # a package (tests.) that path needs importlib_resources, which this TFDS
  # does not require. A one-part module name takes the plain path.
  TinyImagenetForTest.__module__ = 'tiny_imagenet_for_test'
  root = str(tmp_path_factory.mktemp('tfds'))
  TinyImagenetForTest(data_dir=root).download_and_prepare()
  truth = {
      s: {code: label for code, label, _ in ex} for s, ex in examples.items()
  }
  return root, truth


def _tfds_cfg(root, **kwargs):
  # The builder is not registered: tfds.builder finds it in data_dir.
  return _cfg(
      root, name='imagenet2012', tfds_name='tiny_imagenet_for_test', **kwargs
  )


def test_tfds_data_dir_train_and_eval(tfds_dir):
  root, truth = tfds_dir
  ds = input_pipeline.load_imagenet(
      _tfds_cfg(root), process_index=0, process_count=1
  )
  assert ds.name == 'imagenet2012' and ds.num_classes == 1000
  assert (ds.num_train_examples, ds.num_test_examples) == (10, 5)
  assert ds.test_split_name == 'validation'
  batches = _take(ds.train_batches(5, seed=0), 2)
  assert batches[0]['image'].shape == (5, SIZE, SIZE, 3)
  seen = _codes(batches, list(truth['train']))
  assert sorted(c for c, _ in seen) == sorted(truth['train'])
  assert all(truth['train'][c] == label for c, label in seen)
  evals = list(ds.eval_batches(4))
  assert [b['mask'].sum() for b in evals] == [4, 1]
  seen = _codes(evals, list(truth['validation']))
  assert sorted(seen) == sorted(truth['validation'].items())


def test_tfds_resume_and_process_shards(tfds_dir):
  root, truth = tfds_dir
  ds = input_pipeline.load_imagenet(
      _tfds_cfg(root), process_index=0, process_count=1
  )
  full = _take(ds.train_batches(4, seed=2), 5)  # 2 steps per epoch.
  _assert_same_batches(
      _take(ds.train_batches(4, 2, start_step=3), 2), full[3:5]
  )
  eval_seen = []
  for index in range(2):
    shard = input_pipeline.load_imagenet(
        _tfds_cfg(root), process_index=index, process_count=2
    )
    evals = list(shard.eval_batches(2))
    assert len(evals) == 3  # ceil(3 / 1) on both processes.
    eval_seen += [c for c, _ in _codes(evals, list(truth['validation']))]
  assert sorted(eval_seen) == sorted(truth['validation'])


# ----------------------------------------------------------------------------
# Errors and the optional dependency.


def test_user_errors(folder, tmp_path, monkeypatch):
  root, _ = folder
  with pytest.raises(DataError, match='does not exist|not a directory'):
    input_pipeline.load_imagenet(_cfg(str(tmp_path / 'missing')))
  with pytest.raises(DataError, match='no train/'):
    input_pipeline.load_imagenet(_cfg(str(tmp_path)))
  os.makedirs(tmp_path / 'train' / 'ant')
  os.makedirs(tmp_path / 'val' / 'ant')
  with pytest.raises(DataError, match='holds no'):
    input_pipeline.load_imagenet(_cfg(str(tmp_path)))
  with pytest.raises(DataError, match='no prepared imagenet2012'):
    input_pipeline.load_imagenet(_cfg(str(tmp_path), name='imagenet2012'))
  with pytest.raises(DataError, match='Unknown'):
    input_pipeline.load_imagenet(_cfg(root, name='imagenet'))
  with pytest.raises(ConfigError, match='crop_area_range'):
    input_pipeline.load_imagenet(_cfg(root, crop_area_range=(0.5, 0.1)))
  ds = input_pipeline.load_imagenet(
      _cfg(root), process_index=0, process_count=1
  )
  with pytest.raises(ConfigError, match='exceeds'):
    ds.train_batches(16, seed=0)
  monkeypatch.setitem(sys.modules, 'tensorflow', None)
  with pytest.raises(DataError, match='pip install tensorflow'):
    input_pipeline.load_imagenet(_cfg(root))


def test_package_imports_without_tensorflow():
  code = (
      'import sys; sys.modules["tensorflow"] = None; '
      'import gaternet_jax.input_pipeline'
  )
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, '-c', code], check=True, cwd=repo)


def test_pipeline_benchmark_prints_every_stage(folder):
  root, _ = folder
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(repo, 'launch', 'bench_input.py')
  run = lambda *a: subprocess.run(
      [sys.executable, script, *a],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
  )
  proc = run(
      f'--data_dir={os.path.join(root, "train")}',
      '--class_folders',
      '--num_images=32',
      '--warmup_images=8',
      '--batch_size=8',
      f'--image_size={SIZE}',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rates = {}
  for line in proc.stdout.splitlines():
    if line.endswith('images/s'):
      stage, rate, _ = line.rsplit(None, 2)
      rates[stage] = float(rate)
  assert set(rates) == {
      '1 read',
      '2 train decode',
      '3 train batch8',
      '3 eval batch8',
  }, proc.stdout
  assert all(r > 0 for r in rates.values())
  proc = run(f'--data_dir={os.path.join(root, "nowhere")}')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: ')
