"""MAC accounting: dense counts against the well-known figures, exactness at
all-open gates, and what closed gates save, for both gating methods."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from gaternet_jax import macs
from gaternet_jax.models import create_model
from tests import helpers


def _model(backbone, gated=False, num_classes=1000, local=None):
  c = base.base_config()
  c.model.gating = 'gater' if gated else 'local' if local else 'none'
  c.model.backbone = ml_collections.ConfigDict(dict(backbone))
  if local:
    c.model.local_gating.update(local)
  if gated and backbone['name'] == 'imagenet_resnet':
    c.model.gater = ml_collections.ConfigDict(
        dict(name='imagenet_resnet', depth=18, bottleneck=256, batchnorm=True)
    )
  return create_model(c.model, num_classes)


@pytest.mark.parametrize('depth,gmacs', [(18, 1.82), (34, 3.67), (50, 4.11)])
def test_imagenet_resnet_dense_macs(depth, gmacs):
  counter = macs.count(
      _model(dict(name='imagenet_resnet', depth=depth)), (224, 224, 3)
  )
  assert counter.dense_backbone / 1e9 == pytest.approx(gmacs, rel=0.01)
  assert counter.dense_gater == 0


def test_resnet20_dense_macs():
  counter = macs.count(
      _model(dict(name='cifar_resnet', depth=20), num_classes=10), (32, 32, 3)
  )
  # 16*32*32*27 (stem) + 3 stages of 3x3 convs + 2 projections + fc.
  stem = 32 * 32 * 27 * 16
  stage = lambda hw, c, n: n * 2 * hw * hw * 9 * c * c
  expected = (
      stem
      + stage(32, 16, 3)
      + stage(16, 32, 3)
      - 16 * 16 * 9 * 32 * 16
      + stage(8, 64, 3)
      - 8 * 8 * 9 * 64 * 32
      + 16 * 16 * 16 * 32
      + 8 * 8 * 32 * 64
      + 64 * 10
  )
  assert counter.dense_backbone == expected
  assert expected / 1e6 == pytest.approx(41, abs=0.5)


def _closed(spec, site=None, batch=2):
  """All gates open except, for sample 1, every gate of `site` (or all)."""
  g = spec.ones(batch)
  return {
      k: (v.at[1].set(0.0) if site in (None, k) else v) for k, v in g.items()
  }


@pytest.mark.parametrize('kind', ['gaternet', 'local'])
def test_all_open_gates_give_the_dense_count(kind):
  bb = dict(name='cifar_resnet', depth=20)
  model = (
      _model(bb, gated=True, num_classes=10)
      if kind == 'gaternet'
      else _model(bb, num_classes=10, local=dict(hidden=16))
  )
  counter = macs.count(model, (32, 32, 3))
  spec = model.gate_spec()
  per = np.asarray(counter.per_sample(spec.ones(3)))
  np.testing.assert_array_equal(per, float(counter.dense_total))
  assert counter.dense_gater > 0
  closed = np.asarray(counter.per_sample(_closed(spec)))
  assert closed[0] == counter.dense_total and closed[1] < closed[0]


def test_closed_site_saves_the_analytic_amount():
  # GaterNet: a closed unit output removes that unit's conv2 (3x3, 16->16 at
  # 32x32); local gates: conv1's output and conv2's input (both 3x3).
  bb = dict(name='cifar_resnet', depth=20)
  site = 'stage1_block2'
  conv = 32 * 32 * 9 * 16 * 16
  g_model = _model(bb, gated=True, num_classes=10)
  g = macs.count(g_model, (32, 32, 3))
  per = np.asarray(g.per_sample(_closed(g_model.gate_spec(), site)))
  assert per[0] - per[1] == conv
  l_model = _model(bb, num_classes=10, local=dict(hidden=16))
  l = macs.count(l_model, (32, 32, 3))
  per = np.asarray(l.per_sample(_closed(l_model.gate_spec(), site)))
  assert per[0] - per[1] == 2 * conv
  # Half the channels closed: conv1 loses half its outputs, conv2 half its
  # inputs.
  gates = l_model.gate_spec().ones(1)
  gates[site] = gates[site].at[0, :8].set(0.0)
  assert float(l.dense_total - l.per_sample(gates)[0]) == conv


def test_bottleneck_local_gating_positions():
  bb = dict(name='imagenet_resnet', depth=50, widths=(8, 16, 32, 64))
  site = 'stage1_block1'  # 56x56, width 8 (out 32), input 8 channels
  hw = 16 * 16  # a 64x64 input: stem /2, pool /2
  for position, saved in (
      ('conv1', hw * (8 * 8 + 9 * 8 * 8)),
      ('conv2', hw * (9 * 8 * 8 + 8 * 32)),
  ):
    model = _model(bb, local=dict(position=position))
    counter = macs.count(model, (64, 64, 3))
    per = np.asarray(counter.per_sample(_closed(model.gate_spec(), site)))
    assert per[0] - per[1] == saved, position


def test_baseline_and_jit():
  model = _model(
      dict(name='cifar_resnet', depth=8, widths=(4, 8, 16)), num_classes=3
  )
  counter = macs.count(model, (16, 16, 3))
  assert not counter.spec and counter.dense_gater == 0
  assert float(counter.per_sample({})[0]) == counter.dense_backbone
  c = helpers.tiny_local_config()
  model = create_model(c.model, 3)
  counter = macs.count(model, (16, 16, 3))
  spec = model.gate_spec()
  f = jax.jit(counter.per_sample)
  g = jax.tree_util.tree_map(
      lambda x: (jax.random.uniform(jax.random.key(0), x.shape) > 0.5).astype(
          jnp.float32
      ),
      spec.ones(4),
  )
  np.testing.assert_allclose(f(g), counter.per_sample(g))
  rows = counter.per_layer()
  assert sum(r['macs'] for r in rows) == counter.dense_total
  assert any(r['overhead'] for r in rows) and any(r['gated'] for r in rows)


def test_format_macs():
  assert macs.format_macs(4.11e9) == '4.11G'
  assert macs.format_macs(40.8e6) == '40.8M'


def test_large_network_savings_stay_exact():
  # ResNet-50 with local gates costs ~4.1G MACs, far above float32's 2**24
  # integer range: the savings are summed alone, so open gates save exactly
  # 0 and one closed site saves exactly its analytic amount.
  model = _model(dict(name='imagenet_resnet', depth=50), local=dict(hidden=16))
  counter = macs.count(model, (224, 224, 3))
  assert counter.dense_total > 2**31
  spec = model.gate_spec()
  saved = np.asarray(counter.saved_per_sample(spec.ones(2)))
  np.testing.assert_array_equal(saved, 0.0)
  # stage1_block1 at 56x56: 64 channels between the 1x1 (64 -> 64) and the
  # 3x3 (64 -> 64).
  hw = 56 * 56
  saved = counter.saved_per_sample(_closed(spec, 'stage1_block1'))
  assert float(saved[1]) == hw * (64 * 64 + 9 * 64 * 64)
  # The eval summary subtracts in float64 on the host.
  from gaternet_jax import evaluation

  s = evaluation.summarize_macs(
      counter.dense_total - np.asarray(saved, np.float64), counter
  )
  assert s['macs_max'] == counter.dense_total
  assert s['macs_overhead'] == counter.dense_gater
  assert s['macs_backbone_reduction'] == pytest.approx(
      float(saved[1]) / 2 / counter.dense_backbone, rel=1e-12
  )


def test_training_report_shows_macs(capsys):
  from gaternet_jax import cli  # pylint: disable=g-import-not-at-top

  gated = {
      'split': 'test',
      'accuracy': 0.99,
      'loss': 0.05,
      'gated_filters': 4,
      'gates_on_fraction': 0.5,
      'gates_always_on': 1,
      'gates_always_off': 1,
      'gates_input_dependent': 2,
      'macs_dense': 1e6,
      'macs_overhead': 5e5,
      'macs_mean': 1.25e6,
      'macs_reduction': -0.25,
      'macs_backbone_reduction': 0.25,
  }
  base = {
      'split': 'test',
      'accuracy': 0.995,
      'loss': 0.04,
      'macs_dense': 1e6,
      'macs_overhead': 0.0,
      'macs_mean': 1e6,
      'macs_reduction': 0.0,
      'macs_backbone_reduction': 0.0,
  }
  cli.print_training_report({'baseline': base, 'final': gated}, 61.0)
  lines = capsys.readouterr().out.splitlines()
  assert 'MACs/image' in lines[1]
  assert '1M (+0.0%)' in lines[2] and '1.25M (+25.0%)' in lines[3]
  assert lines[4] == (
      'MACs/image include 500K of gating overhead over a 1M '
      'dense backbone; the gates save 25.0% of the backbone.'
  )
