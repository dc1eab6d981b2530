"""End to end: a trained digits workdir compacted, evaluated and timed.

One short training run (batch-shaping's local gates on the digits demo's
ResNet-8, few steps, gate logits started low so that some gates stay off
for every image) is shared by every test here.
"""

import importlib.util
import json
import os

import ml_collections
import pytest

from configs import digits_bas
from gaternet_jax import cli
from gaternet_jax.errors import ConfigError, UserError, WorkdirError

pytestmark = pytest.mark.xdist_group('compact_main')


def _config():
  c = digits_bas.get_config()
  c.pretrain.enabled = False
  c.num_train_steps = 12
  c.log_every_steps = 6
  c.checkpoint_every_steps = 12
  c.eval_every_epochs = 1000.0
  c.tensorboard = False
  c.progress_every_secs = 1000.0
  c.model.backbone.widths = (8, 8, 8)
  c.model.local_gating.bias_init = -0.4
  c.eval_batch_size = 360
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('digits') / 'run')
  results = cli.run('train', _config(), workdir)
  return workdir, results['final']


@pytest.fixture(scope='module')
def compacted(trained, tmp_path_factory):
  workdir, _ = trained
  output = str(tmp_path_factory.mktemp('compacted') / 'small')
  config = _config()
  config.compact.output = output
  report = cli.run('compact', config, workdir)
  return output, report


def _load_config(path):
  spec = importlib.util.spec_from_file_location('compacted_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_compaction_removes_filters_and_evaluates_the_same(trained, compacted):
  _, trained_eval = trained
  output, report = compacted
  gates = report['gates']
  # The run keeps all three kinds of gate, so each path is exercised.
  assert gates['always_off'] > 0, gates
  assert gates['input_dependent'] > 0, gates
  assert report['max_relative_logit_error'] <= 1e-5
  assert report['gate_mismatches'] == 0
  assert report['params_after'] < report['params_before']
  assert report['macs_backbone_after'] < report['macs_backbone_before']
  assert sorted(os.listdir(output)) == [
      'checkpoints',
      'compaction.json',
      'config.json',
      'config.py',
  ]
  with open(os.path.join(output, 'compaction.json')) as f:
    assert json.load(f)['gates'] == gates
  # Its config.py gives its config; eval then reads it like any run.
  config = _load_config(os.path.join(output, 'config.py'))
  assert config.model.compaction
  small_eval = cli.run('eval', config, output)
  assert small_eval['accuracy'] == trained_eval['accuracy']
  assert small_eval['loss'] == pytest.approx(trained_eval['loss'], rel=1e-5)
  assert small_eval['step'] == trained_eval['step']
  # The same conditional MACs per image: the removed filters were the ones
  # the trained model's gates switched off for every image.
  assert small_eval['macs_mean'] == pytest.approx(
      trained_eval['macs_mean'], rel=1e-6
  )
  assert small_eval['gated_filters'] == gates['input_dependent']
  # The calibration split was train; on test, images may open a gate that
  # train never did: counted, not hidden.
  assert 0.0 <= small_eval['unseen_gate_fraction'] <= 1.0
  # Summary of the compacted config shows the smaller network and the one
  # it came from.
  summary = cli.run('summary', config, '')
  assert summary['params_total'] == report['params_after']
  assert summary['macs_backbone'] == report['macs_backbone_after']
  assert summary['params_uncompacted'] == report['params_before']
  assert summary['macs_backbone_uncompacted'] == report['macs_backbone_before']
  # And analyze reads it like any run.
  config.analysis.tsne_samples = 0
  analysis = cli.run('analyze', config, output)
  assert analysis['gated_filters'] == gates['input_dependent']
  assert analysis['accuracy'] == trained_eval['accuracy']


def test_compaction_never_overwrites(trained, compacted):
  workdir, _ = trained
  output, _ = compacted
  config = _config()
  config.compact.output = output
  with pytest.raises(WorkdirError, match='already holds files'):
    cli.run('compact', config, workdir)
  config.compact.output = workdir
  with pytest.raises(WorkdirError, match='is the trained --workdir'):
    cli.run('compact', config, workdir)
  config.compact.output = ''
  with pytest.raises(ConfigError, match='--config.compact.output='):
    cli.run('compact', config, workdir)


def test_a_baseline_workdir_cannot_be_compacted(tmp_path):
  config = _config()
  config.model.gating = 'none'
  config.compact.output = str(tmp_path / 'out')
  with pytest.raises(UserError, match="model.gating='none'"):
    cli.run('compact', config, str(tmp_path / 'nothing_trained'))


def test_speed_mode_refuses_what_it_cannot_time(tmp_path):
  config = _config()
  config.model.gating = 'gater'
  config.model.backbone = ml_collections.ConfigDict(
      dict(name='densenet_bc', depth=16, growth_rate=8)
  )
  with pytest.raises(UserError, match='supports the ResNet backbones'):
    cli.run('speed', config, None)
  with pytest.raises(WorkdirError, match='no checkpoint to time'):
    cli.run('speed', _config(), str(tmp_path))


def test_speed_mode_times_the_trained_model(trained):
  workdir, _ = trained
  config = _config()
  config.speed.densities = (0.5,)
  config.speed.runs = 2
  config.speed.warmup = 1
  config.speed.batch_size = 16
  result = cli.run('speed', config, workdir)
  assert result['trained']
  assert result['dynamic_max_relative_error'] < 1e-4
  assert set(result['rows']) == {'trained', '50%'}
  for row in result['rows'].values():
    for way in ('masked', 'compacted', 'dynamic'):
      r = row[way]
      assert r['latency_ms'] > 0 and r['images_per_s'] > 0
      assert r['mac_speedup'] == pytest.approx(
          result['dense']['macs'] / r['macs']
      )
  # Half the gates on saves MACs; the masked model's count equals the
  # dynamic one's (same gates), the compacted one draws its own.
  half = result['rows']['50%']
  assert half['dynamic']['mac_speedup'] > 1.2
  assert half['masked']['macs'] == half['dynamic']['macs']
