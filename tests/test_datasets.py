"""Tests for gaternet_jax.datasets: every source implements the Dataset
protocol, and each says which augmentation the train step applies."""

import json
import os

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs import cifar10_r20
from configs import default as digits_config
from configs import imagenet_fake_r18
from configs import imagenet_r50
from gaternet_jax import augment
from gaternet_jax import data
from gaternet_jax import datasets
from gaternet_jax import experiment
from gaternet_jax import fingerprint
from gaternet_jax.errors import ConfigError
from tests import helpers

# Members of the protocol (attributes and methods).
_MEMBERS = (
    'name',
    'num_classes',
    'mean',
    'std',
    'test_split_name',
    'image_shape',
    'num_train_examples',
    'num_test_examples',
    'augmentation',
    'steps_per_epoch',
    'train_batches',
    'eval_batches',
    'train_arrays',
)


def _check_protocol(ds):
  assert isinstance(ds, datasets.Dataset)
  for member in _MEMBERS:  # isinstance alone would miss a typo'd member.
    assert hasattr(ds, member), member
  assert isinstance(ds.augmentation, augment.Augmentation)
  assert len(ds.mean) == len(ds.std) == ds.image_shape[-1]
  assert ds.steps_per_epoch(4) >= 1
  batch = next(ds.train_batches(4, seed=0))
  assert batch['image'].shape[1:] == tuple(ds.image_shape)
  assert batch['image'].dtype == np.uint8
  assert 'mask' in next(iter(ds.eval_batches(4)))


def test_protocol_members_are_the_listed_ones():
  declared = {m for m in dir(datasets.Dataset) if not m.startswith('_')}
  declared |= set(datasets.Dataset.__annotations__)
  assert declared == set(_MEMBERS)


def test_in_memory_datasets_implement_the_protocol():
  digits = data.load_dataset(digits_config.get_config().data)
  synthetic = helpers.synthetic_dataset()
  for ds in (digits, synthetic):
    _check_protocol(ds)
    arrays = ds.train_arrays()
    assert arrays['image'] is ds.train_images
    assert arrays['label'] is ds.train_labels
  # Their augmentation is their config's pad-crop and flip.
  assert digits.augmentation == augment.Augmentation(crop_padding=1, flip=False)
  assert synthetic.augmentation == augment.Augmentation(
      crop_padding=2, flip=True
  )


def test_fake_dataset_implements_the_protocol():
  ds = data.load_dataset(imagenet_fake_r18.get_config().data)
  assert isinstance(ds, data.FakeDataset)
  _check_protocol(ds)
  assert ds.train_arrays() is None
  assert ds.augmentation == augment.NO_AUGMENTATION


def _write_image_folder(root):
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for cls in ('ant', 'bee'):
      os.makedirs(os.path.join(root, split, cls))
      for i in range(4):
        pixels = rng.integers(0, 256, (20, 24, 3), np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, cls, f'{i}.png'))


def test_tfdata_dataset_implements_the_protocol_without_step_augmentation(
    tmp_path,
):
  pytest.importorskip('tensorflow')
  from gaternet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  _write_image_folder(str(tmp_path))
  config = imagenet_r50.get_config()
  config.data.name = 'image_folder'
  config.data.data_dir = str(tmp_path)
  config.data.image_size = 16
  config.data.shuffle_buffer = 4
  ds = data.load_dataset(config.data)
  assert isinstance(ds, input_pipeline.TfdataDataset)
  _check_protocol(ds)
  # tf.data crops and flips; the step adds nothing and holds no arrays.
  assert ds.augmentation == augment.NO_AUGMENTATION
  assert ds.train_arrays() is None


def test_train_augmentation_of_the_configs():
  assert data.train_augmentation(digits_config.get_config().data) == (
      augment.Augmentation(crop_padding=1, flip=False)
  )
  assert data.train_augmentation(cifar10_r20.get_config().data) == (
      augment.Augmentation(crop_padding=4, flip=True)
  )
  assert data.train_augmentation(imagenet_r50.get_config().data) == (
      augment.NO_AUGMENTATION
  )
  # A setup without data (the benchmark) augments as the dataset would.
  for config, expected in (
      (cifar10_r20.get_config(), augment.Augmentation(4, True)),
      (imagenet_fake_r18.get_config(), augment.NO_AUGMENTATION),
  ):
    exp = experiment.setup(config, load_data=False, count_macs=False)
    assert exp.augmentation == expected


def test_train_augmentation_errors():
  streamed = imagenet_r50.get_config().data
  streamed.crop_padding = 4
  with pytest.raises(ConfigError, match='tf.data pipeline'):
    data.train_augmentation(streamed)
  streamed.crop_padding = 0
  streamed.flip = False  # What ImageNet configs used to say: no error.
  assert data.train_augmentation(streamed) == augment.NO_AUGMENTATION
  with pytest.raises(ConfigError, match='crop_padding'):
    data.train_augmentation(ConfigDict(dict(name='digits', crop_padding=-1)))


def test_data_schema_is_the_package_defaults():
  """configs/base.py's data fields are exactly datasets.DATA_DEFAULTS'."""
  from configs import base  # pylint: disable=g-import-not-at-top

  assert set(base.base_config().data.keys()) == set(datasets.DATA_DEFAULTS)
  complete = datasets.data_config(ConfigDict(dict(name='digits')))
  assert complete.name == 'digits'
  for key, default in datasets.DATA_DEFAULTS.items():
    if key != 'name':
      assert complete[key] == default, key
  assert datasets.data_config().to_dict() == datasets.DATA_DEFAULTS


def test_unknown_data_field_is_a_config_error():
  with pytest.raises(ConfigError, match='data.crop_pading'):
    datasets.data_config(ConfigDict(dict(name='digits', crop_pading=4)))
  with pytest.raises(ConfigError, match='data.imagesize'):
    data.dataset_info(dict(name='fake', imagesize=32))
  with pytest.raises(ConfigError, match='data.flips'):
    data.load_dataset(ConfigDict(dict(name='digits', flips=True)))


def test_imagenet_workdir_of_the_old_config_resumes(tmp_path):
  """Old ImageNet config.json files say crop_padding=0, flip=False; today's
  configs leave them unset, which means the same."""
  config = imagenet_r50.get_config()
  old = json.loads(config.to_json_best_effort())
  old['data'].update(crop_padding=0, flip=False)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  fingerprint.check_workdir(config, str(tmp_path))  # pylint: disable=protected-access
