"""The gating method: one config field, one model property, one baseline."""

import json
import os

import jax
import ml_collections
import pytest

from configs import cifar10_r20_baseline, default, digits_bas, digits_bas_l0
from gaternet_jax import benchmark
from gaternet_jax import fingerprint
from gaternet_jax import gating
from gaternet_jax.errors import ConfigError, WorkdirError
from gaternet_jax.models import create_model
from tests import helpers


def _params(model, shape=(1, 8, 8, 1)):
  variables = jax.eval_shape(
      lambda: model.init(
          {'params': jax.random.key(0), 'gates': jax.random.key(1)},
          jax.numpy.zeros(shape),
          train=False,
      )
  )
  return jax.tree_util.tree_map(lambda a: a.shape, variables['params'])


@pytest.mark.parametrize(
    'config,method',
    [
        (default.get_config(), 'gater'),
        (digits_bas.get_config(), 'local'),
        (digits_bas_l0.get_config(), 'local'),
        (cifar10_r20_baseline.get_config(), 'none'),
    ],
)
def test_config_model_and_benchmark_agree_on_the_method(config, method):
  assert gating.method(config) == method
  model = create_model(config.model, 10)
  assert model.gating == method
  assert (model.gate_spec().total > 0) == (method != 'none')
  # The benchmark measures every gated config against its ungated backbone
  # (it used to call a batch-shaping model 'baseline' and measure it once).
  cfgs = benchmark.variants(config)
  assert list(cfgs) == (
      ['baseline'] if method == 'none' else ['gated', 'baseline']
  )
  assert cfgs['gated' if method != 'none' else 'baseline'] is config
  base = create_model(cfgs['baseline'].model, 10)
  assert base.gating == 'none' and base.gate_spec().total == 0
  backbone = _params(base)['backbone']
  if method == 'gater':  # The same backbone, and no gater.
    assert _params(model)['backbone'] == backbone
    assert 'gater' in _params(model) and 'gater' not in _params(base)
  if method == 'local':  # The same convs, without the gating modules.
    local = _params(model)['backbone']
    assert local != backbone
    strip = lambda t: {
        k: strip(v) if isinstance(v, dict) else v
        for k, v in t.items()
        if k != 'gate'
    }
    assert strip(local) == backbone


def test_ungated_drops_the_gates_losses_and_stages():
  c = gating.ungated(digits_bas_l0.get_config())
  assert c.model.gating == 'none' and not gating.gate_losses_enabled(c)
  assert c.gate_l1_weight == 0 and c.model.gate_dropout == 0
  assert not c.pretrain.enabled and not c.init.official_checkpoint
  # The training scheme stays.
  assert c.batch_size == digits_bas.get_config().batch_size
  assert c.optimizer.to_dict() == digits_bas.get_config().optimizer.to_dict()


def test_unknown_or_old_style_methods_are_one_sentence():
  c = helpers.tiny_config()
  c.model.gating = 'semhash'
  with pytest.raises(ConfigError, match="model.gating must be one of 'none'"):
    gating.method(c)
  c = helpers.tiny_config()
  c.model.gated = True
  with pytest.raises(ConfigError, match='model.gated was replaced'):
    create_model(c.model, 3)


@pytest.mark.parametrize('module', [default, digits_bas])
def test_a_workdir_written_in_the_old_terms_still_resumes(tmp_path, module):
  """config.json of the previous version (model.gated, backbone.local_gating
  with `enabled`, no semhash.binarize) is the same network."""
  config = module.get_config()
  old = json.loads(config.to_json_best_effort())
  model = old['model']
  model['gated'] = model.pop('gating') == 'gater'
  local = model.pop('local_gating')
  if module is digits_bas:
    model['backbone']['local_gating'] = dict(local, enabled=True)
  del model['semhash']['binarize']
  wd = str(tmp_path)
  with open(os.path.join(wd, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(old, f)
  fingerprint.check_workdir(config, wd)
  other = ml_collections.ConfigDict(config.to_dict())
  other.model.gating = 'none'
  with pytest.raises(WorkdirError, match='different `model`'):
    fingerprint.check_workdir(other, wd)
