"""Tests for gaternet_jax.cityscapes on tiny frames in the official layouts."""

import io
import os
import re
import socket
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from gaternet_jax import augment
from gaternet_jax import batching
from gaternet_jax import cityscapes
from gaternet_jax import datasets
from gaternet_jax.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 16, 32
# Real labelIds (void 0, road 7, car 26, bicycle 33, ...) and ids no frame
# should hold (34, 100, 255: license plates are -1, i.e. 255 as uint8).
IDS = np.array([0, 1, 6, 7, 8, 11, 24, 26, 30, 33, 34, 100, 255], np.uint8)
# The cityscapesscripts table, written out again so the test checks it.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8}
TRAIN_IDS.update({22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15})
TRAIN_IDS.update({31: 16, 32: 17, 33: 18})
# {split: [(city, frame id)]} in sorted order.
FRAMES = {
    'train': [('aachen', 0), ('aachen', 3), ('aachen', 7), ('bonn', 1)],
    'val': [('frankfurt', 2), ('lindau', 0), ('lindau', 5)],
}
FRAMES['train'].append(('bonn', 4))
FRAMES['test'] = [('berlin', 0)]


def _expected_train_ids(ids, ignore=255):
  out = np.full(ids.shape, ignore, np.int32)
  for label_id, train_id in TRAIN_IDS.items():
    out[ids == label_id] = train_id
  return out


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _stem(city, frame):
  return f'{city}_{frame:06d}_000019'


@pytest.fixture(scope='module')
def frames():
  """{split: [(image (16, 32, 3) uint8, labelIds (16, 32) uint8)]}."""
  rng = np.random.default_rng(0)
  out = {}
  for split, names in FRAMES.items():
    out[split] = []
    for _ in names:
      image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)
      ids = rng.choice(IDS, (HEIGHT, WIDTH)).astype(np.uint8)
      out[split].append((image, ids))
  return out


def _files(frames):
  """{relative path: PNG bytes} of both archives' members."""
  files = {}
  for split, names in FRAMES.items():
    for (city, frame), (image, ids) in zip(names, frames[split]):
      stem = _stem(city, frame)
      files[f'leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png'] = _png(image)
      files[f'gtFine/{split}/{city}/{stem}_gtFine_labelIds.png'] = _png(ids)
  return files


def _write_folder(root, files):
  for rel, blob in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(blob)
  return str(root)


@pytest.fixture(scope='module')
def folder(tmp_path_factory, frames):
  return _write_folder(tmp_path_factory.mktemp('cityscapes'), _files(frames))


def _load(data_dir, **fields):
  fields = dict(dict(name='cityscapes', source='folder'), **fields)
  cfg = datasets.data_config(dict(fields, data_dir=data_dir))
  aug = augment.SegmentationAugmentation(crop_size=(HEIGHT, WIDTH))
  return cityscapes.load_cityscapes(cfg, aug)


def _assert_one_sentence(error):
  message = str(error.value)
  assert message.endswith('.') and '\n' not in message, message
  assert not re.search(r'\.\s+[A-Z]', message), message


def _stacked(frames, split):
  images = np.stack([image for image, _ in frames[split]])
  labels = np.stack([_expected_train_ids(ids) for _, ids in frames[split]])
  return images, labels


# ----------------------------------------------------------------------------
# The table.


def test_train_id_table_is_the_official_one():
  table = cityscapes.train_id_table(255)
  assert table.shape == (256,) and table.dtype == np.int32
  np.testing.assert_array_equal(
      table, _expected_train_ids(np.arange(256, dtype=np.uint8))
  )
  assert len(cityscapes.TRAIN_ID_NAMES) == cityscapes.NUM_CLASSES == 19
  assert cityscapes.TRAIN_ID_NAMES[13] == 'car'
  wide = np.array([[-1, 7, 300, 33]])
  np.testing.assert_array_equal(
      cityscapes.to_train_ids(wide, 99), [[99, 0, 99, 18]]
  )


# ----------------------------------------------------------------------------
# folder


def test_folder_dataset_attributes(folder):
  ds = _load(folder, image_size=0)
  assert isinstance(ds, datasets.Dataset)
  assert ds.name == 'cityscapes' and ds.num_classes == 19
  assert ds.image_shape == (HEIGHT, WIDTH, 3)
  assert ds.num_train_examples == 5 and ds.num_test_examples == 3
  assert ds.test_split_name == 'val'
  assert ds.mean == (0.485, 0.456, 0.406)
  assert ds.std == (0.229, 0.224, 0.225)
  assert ds.augmentation.crop_size == (HEIGHT, WIDTH)
  assert ds.train_arrays() is None
  assert ds.steps_per_epoch(2) == 2
  with pytest.raises(ConfigError) as error:
    ds.steps_per_epoch(6)
  _assert_one_sentence(error)


def test_folder_eval_covers_every_frame_once_with_mask(folder, frames):
  ds = _load(folder, image_size=0, num_parallel_calls=2)
  batches = list(ds.eval_batches(2))
  assert len(batches) == 2
  for batch in batches:
    assert batch['image'].shape == (2, HEIGHT, WIDTH, 3)
    assert batch['image'].dtype == np.uint8
    assert batch['label'].shape == (2, HEIGHT, WIDTH)
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
  np.testing.assert_array_equal(batches[0]['mask'], [1, 1])
  np.testing.assert_array_equal(batches[1]['mask'], [1, 0])
  images, labels = _stacked(frames, 'val')
  got_images = np.concatenate([b['image'] for b in batches])[:3]
  got_labels = np.concatenate([b['label'] for b in batches])[:3]
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert set(np.unique(got_labels)) <= set(range(19)) | {255}


def test_folder_train_batches_deterministic_resume_and_reshuffle(
    folder, frames
):
  ds = _load(folder, image_size=0, ignore_label=250)
  images, _ = _stacked(frames, 'train')
  labels = np.stack(
      [_expected_train_ids(ids, 250) for _, ids in frames['train']]
  )
  stream = ds.train_batches(2, seed=3)
  batches = [next(stream) for _ in range(6)]
  stream.close()
  # The order is batching's: the in-memory datasets' for the same seed.
  n = len(images)
  reference = batching.train_batches(np.arange(n), np.arange(n), 2, 3)
  order = []
  for batch in batches:
    idx = next(reference)['label']
    order.append(tuple(idx))
    assert batch['image'].shape == (2, HEIGHT, WIDTH, 3)  # one process
    np.testing.assert_array_equal(batch['image'], images[idx])
    np.testing.assert_array_equal(batch['label'], labels[idx])
  resumed = ds.train_batches(2, seed=3, start_step=3)
  for batch in batches[3:]:
    again = next(resumed)
    np.testing.assert_array_equal(again['image'], batch['image'])
    np.testing.assert_array_equal(again['label'], batch['label'])
  # Epochs are 2 steps; each draws its own order.
  epochs = {order[e] + order[e + 1] for e in (0, 2, 4)}
  assert len(epochs) == 3
  other = next(ds.train_batches(2, seed=4))
  assert not np.array_equal(other['image'], batches[0]['image'])


def test_folder_resize(folder, frames):
  ds = _load(folder, image_size=8)  # an int s: s x 2s
  assert ds.image_shape == (8, 16, 3)
  batch = next(iter(ds.eval_batches(3)))
  assert batch['image'].shape == (3, 8, 16, 3)
  assert batch['label'].shape == (3, 8, 16)
  for i, (image, ids) in enumerate(frames['val']):
    small = Image.fromarray(image).resize((16, 8), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(batch['image'][i], np.asarray(small))
    nearest = Image.fromarray(ids).resize((16, 8), Image.Resampling.NEAREST)
    np.testing.assert_array_equal(
        batch['label'][i], _expected_train_ids(np.asarray(nearest))
    )
  assert set(np.unique(batch['label'])) <= set(range(19)) | {255}
  pair = _load(folder, image_size=(12, 20), num_test_examples=1)
  assert pair.image_shape == (12, 20, 3)
  (only,) = list(pair.eval_batches(1))
  assert only['image'].shape == (1, 12, 20, 3)
  assert only['label'].shape == (1, 12, 20)


def test_folder_caps_keep_the_first_frames(folder, frames):
  ds = _load(folder, num_train_examples=3, num_test_examples=2, image_size=0)
  assert ds.num_train_examples == 3 and ds.num_test_examples == 2
  batch = next(iter(ds.eval_batches(2)))
  np.testing.assert_array_equal(batch['image'], _stacked(frames, 'val')[0][:2])
  for _ in range(2):
    seen = next(ds.train_batches(3, seed=0))['image']
    assert {im.tobytes() for im in seen} == {
        im.tobytes() for im in _stacked(frames, 'train')[0][:3]
    }


def test_folder_errors(tmp_path, frames):
  files = _files(frames)
  with pytest.raises(DataError) as error:
    _load(str(tmp_path / 'nowhere'))
  _assert_one_sentence(error)

  no_labels = {k: v for k, v in files.items() if k.startswith('leftImg8bit')}
  root = _write_folder(tmp_path / 'no_gtfine', no_labels)
  with pytest.raises(DataError, match='no gtFine/ folder') as error:
    _load(root)
  _assert_one_sentence(error)

  dropped = [k for k in files if k.startswith('gtFine/train/')][1:3]
  partial = {k: v for k, v in files.items() if k not in dropped}
  root = _write_folder(tmp_path / 'some_labels', partial)
  with pytest.raises(DataError, match='2 of the 5 images') as error:
    _load(root)
  _assert_one_sentence(error)
  assert os.path.join(root, dropped[0]) in str(error.value)

  with pytest.raises(DataError, match='no split|does not exist') as error:
    _load(_write_folder(tmp_path / 'splits', files), eval_split='test2')
  _assert_one_sentence(error)

  bad = dict(files)
  bad['leftImg8bit/val/frankfurt/frankfurt_000002_000019_leftImg8bit.png'] = (
      b'not a png'
  )
  ds = _load(_write_folder(tmp_path / 'corrupt', bad), image_size=4)
  with pytest.raises(DataError, match='Cannot decode image') as error:
    list(ds.eval_batches(3))
  _assert_one_sentence(error)

  mixed = dict(files)
  mixed['leftImg8bit/val/lindau/lindau_000005_000019_leftImg8bit.png'] = _png(
      np.zeros((8, 8, 3), np.uint8)
  )
  ds = _load(_write_folder(tmp_path / 'mixed', mixed), image_size=0)
  with pytest.raises(DataError, match='set data.image_size') as error:
    list(ds.eval_batches(3))
  _assert_one_sentence(error)

  for field in (
      dict(image_size=-1),
      dict(ignore_label=3),
      dict(source='zip'),
      dict(std=(1.0, 0.0, 1.0)),
  ):
    with pytest.raises((ConfigError, DataError)) as error:
      _load(tmp_path, **field)
    _assert_one_sentence(error)


# ----------------------------------------------------------------------------
# tfds


def _write_zips(manual_dir, files):
  os.makedirs(manual_dir, exist_ok=True)
  for archive, prefix in (
      ('leftImg8bit_trainvaltest.zip', 'leftImg8bit/'),
      ('gtFine_trainvaltest.zip', 'gtFine/'),
  ):
    with zipfile.ZipFile(os.path.join(manual_dir, archive), 'w') as z:
      for rel, blob in files.items():
        if rel.startswith(prefix):
          z.writestr(rel, blob)


def test_tfds_prepares_the_zips_and_reads_them(tmp_path, frames):
  pytest.importorskip('tensorflow_datasets')
  pytest.importorskip('array_record')
  data_dir = str(tmp_path / 'tfds')
  cfg = dict(source='tfds', data_dir=data_dir, image_size=0)
  with pytest.raises(DataError, match='gtFine_trainvaltest.zip') as error:
    _load(**cfg)
  _assert_one_sentence(error)
  assert os.path.join(data_dir, 'downloads', 'manual') in str(error.value)

  _write_zips(os.path.join(data_dir, 'downloads', 'manual'), _files(frames))
  ds = _load(**cfg)
  assert ds.test_split_name == 'validation'
  assert ds.num_train_examples == 5 and ds.num_test_examples == 3
  assert ds.image_shape == (HEIGHT, WIDTH, 3)
  # TFDS keeps its own (hashed) record order: match frames by content.
  for split, batches in (
      ('val', list(ds.eval_batches(2))),
      ('train', list(_take(ds.train_batches(5, seed=1), 1))),
  ):
    images = np.concatenate([b['image'] for b in batches])
    labels = np.concatenate([b['label'] for b in batches])
    if 'mask' in batches[-1]:
      keep = np.concatenate([b['mask'] for b in batches]) > 0
      images, labels = images[keep], labels[keep]
    want_images, want_labels = _stacked(frames, split)
    order = [
        [im.tobytes() for im in want_images].index(im.tobytes())
        for im in images
    ]
    assert sorted(order) == list(range(len(want_images)))
    np.testing.assert_array_equal(labels, want_labels[order])
  # Already prepared: loads again without the zips.
  os.remove(
      os.path.join(data_dir, 'downloads', 'manual', 'gtFine_trainvaltest.zip')
  )
  again = _load(**dict(cfg, image_size=4, num_test_examples=2))
  batch = next(iter(again.eval_batches(2)))
  assert batch['image'].shape == (2, 4, 8, 3)
  assert set(np.unique(batch['label'])) <= set(range(19)) | {255}


def _take(iterator, n):
  for _ in range(n):
    yield next(iterator)


# ----------------------------------------------------------------------------
# Several processes.

_PROCESS = """
import sys
import jax
import numpy as np
from gaternet_jax import cityscapes, datasets
port, index, folder, out = sys.argv[1:]
jax.distributed.initialize(f'127.0.0.1:{port}', 2, int(index))
assert jax.process_count() == 2
cfg = datasets.data_config(
    dict(name='cityscapes', source='folder', data_dir=folder, image_size=0))
ds = cityscapes.load_cityscapes(cfg, None)
train = next(ds.train_batches(4, seed=5, start_step=1))
evals = list(ds.eval_batches(4))
np.savez(out, train_image=train['image'], train_label=train['label'],
         eval_image=np.concatenate([b['image'] for b in evals]),
         eval_mask=np.concatenate([b['mask'] for b in evals]))
jax.distributed.shutdown()
"""


def test_two_processes_decode_their_own_rows(folder, tmp_path):
  """Two local processes joined by jax.distributed: each gets its half of
  every global batch, the halves making up the one-process batch."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in [env.get('PYTHONPATH')] if p]
  )
  outs = [str(tmp_path / f'process{i}.npz') for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', _PROCESS, str(port), str(i), folder, out],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i, out in enumerate(outs)
  ]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-2000:]
  parts = [np.load(out) for out in outs]
  ds = _load(folder, image_size=0)
  train = next(ds.train_batches(4, seed=5, start_step=1))
  evals = list(ds.eval_batches(4))
  for part in parts:
    assert part['train_image'].shape == (2, HEIGHT, WIDTH, 3)
  np.testing.assert_array_equal(
      np.concatenate([p['train_image'] for p in parts]), train['image']
  )
  np.testing.assert_array_equal(
      np.concatenate([p['train_label'] for p in parts]), train['label']
  )
  # One eval batch of 4 for 3 frames: process 1 holds the padding row.
  np.testing.assert_array_equal(parts[0]['eval_mask'], [1, 1])
  np.testing.assert_array_equal(parts[1]['eval_mask'], [1, 0])
  np.testing.assert_array_equal(
      np.concatenate([p['eval_image'] for p in parts]),
      evals[0]['image'],
  )
