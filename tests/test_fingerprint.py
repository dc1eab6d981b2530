"""The workdir check compares what a run's model and dataset say of
themselves (fingerprint.py), not config fields."""

import json
import os
import time

import pytest

from configs import cifar10_r20, cifar10_r20_baseline, imagenet_r152
from gaternet_jax import data as data_lib
from gaternet_jax import fingerprint
from gaternet_jax.errors import WorkdirError
from tests import helpers


def _write(workdir, stored):
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(stored, f)


def _stored(config):
  return json.loads(config.to_json_best_effort())


def test_fingerprint_is_the_network_and_dataset_without_loading_data(
    monkeypatch,
):
  def no_loading(*_):
    raise AssertionError('the fingerprint loaded a dataset')

  monkeypatch.setattr(data_lib, 'load_dataset', no_loading)
  start = time.time()
  fp = fingerprint.fingerprint(imagenet_r152.get_config())
  assert time.time() - start < 60  # traced, never run: seconds on a CPU
  assert json.loads(json.dumps(fp)) == fp
  assert fp['data'] == {
      'name': 'imagenet2012',
      'image_shape': [224, 224, 3],
      'num_classes': 1000,
  }
  model = fp['model']
  assert model['gating'] == 'gater'
  assert len(model['gate_sites']) == 50  # one per bottleneck unit (3+8+36+3)
  assert model['variables']['params/backbone/fc/kernel'] == [
      [2048, 1000],
      'float32',
  ]
  assert any(p.startswith('batch_stats/') for p in model['variables'])


def test_a_change_of_parameter_shapes_is_refused_and_named(tmp_path):
  wd = str(tmp_path)
  _write(wd, _stored(cifar10_r20_baseline.get_config()))
  wider = cifar10_r20_baseline.get_config()
  wider.model.backbone.widths = (16, 32, 128)
  with pytest.raises(
      WorkdirError,
      match=r'different `model` config \(its '
      r'.*\(64,\) float32, this config.s \(128,\)',
  ):
    fingerprint.check_workdir(wider, wd)
  config = cifar10_r20.get_config()
  _write(wd, _stored(config))
  fingerprint.check_workdir(config, wd)
  wider = cifar10_r20.get_config()
  wider.model.backbone.widths = (16, 32, 128)
  with pytest.raises(
      WorkdirError,
      match='its gate site .* has 64 filters, ' "this config's 128",
  ):
    fingerprint.check_workdir(wider, wd)
  ungated = cifar10_r20.get_config()
  ungated.model.gating = 'none'
  with pytest.raises(WorkdirError, match="its gating is 'gater'"):
    fingerprint.check_workdir(ungated, wd)


def test_fields_that_build_the_same_network_are_accepted(tmp_path):
  wd = str(tmp_path)
  stored = _stored(cifar10_r20_baseline.get_config())
  del stored['model']['backbone']['se_reduction']  # absent is 0
  stored['model']['gater'] = dict(
      stored['model']['gater'], depth=56, bottleneck=99
  )  # unused: ungated
  stored['model']['dtype'] = 'bfloat16'  # compute dtype; params stay float32
  _write(wd, stored)
  config = cifar10_r20_baseline.get_config()
  config.model.backbone.se_reduction = 0
  fingerprint.check_workdir(config, wd)
  config.model.backbone.se_reduction = 4  # builds squeeze-excitation
  with pytest.raises(WorkdirError, match='different `model`.*/se/'):
    fingerprint.check_workdir(config, wd)


def test_a_different_dataset_is_refused_and_where_it_lives_is_not(tmp_path):
  wd = str(tmp_path)
  _write(wd, _stored(cifar10_r20.get_config()))
  moved = cifar10_r20.get_config()
  moved.data.data_dir = '/elsewhere'
  moved.data.flip = False
  moved.data.crop_padding = 0
  moved.batch_size = 64
  moved.eval_batch_size = 500
  fingerprint.check_workdir(moved, wd)
  other = cifar10_r20.get_config()
  other.data.name = 'cifar100'
  with pytest.raises(
      WorkdirError,
      match=r'different `data` config \(its '
      r'dataset is cifar10, \(32, 32, 3\) images of 10 '
      r'classes\)',
  ):
    fingerprint.check_workdir(other, wd)


def test_a_loaded_dataset_is_its_own_identity(tmp_path):
  wd = str(tmp_path)
  config = helpers.tiny_config()
  _write(wd, _stored(config))
  # config.json says no more of a dataset given in memory than its name.
  ds = helpers.synthetic_dataset()
  fingerprint.check_workdir(config, wd, ds)
  config.model.backbone.depth = 14
  with pytest.raises(WorkdirError, match='different `model`'):
    fingerprint.check_workdir(config, wd, ds)


def test_an_older_config_json_is_read_in_todays_terms(tmp_path):
  wd = str(tmp_path)
  stored = _stored(cifar10_r20.get_config())
  model = stored['model']
  model['gated'] = model.pop('gating') == 'gater'
  del model['local_gating'], model['dtype']  # fields it did not write yet
  del model['semhash']['binarize']
  _write(wd, stored)
  fingerprint.check_workdir(cifar10_r20.get_config(), wd)
  model['gated'] = False
  _write(wd, stored)
  with pytest.raises(WorkdirError, match="its gating is 'none'"):
    fingerprint.check_workdir(cifar10_r20.get_config(), wd)


def test_a_model_todays_code_cannot_build_is_refused(tmp_path):
  wd = str(tmp_path)
  stored = _stored(cifar10_r20.get_config())
  stored['model']['backbone']['removed_option'] = 1
  _write(wd, stored)
  with pytest.raises(
      WorkdirError,
      match='different `model` config .*does ' 'not build here.*removed_option',
  ):
    fingerprint.check_workdir(cifar10_r20.get_config(), wd)
