"""Backbones, gater and GaterNet: gate specs, shapes, Table 1's counts."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gaternet_jax import paper
from gaternet_jax import summary
from gaternet_jax.models import (
    BACKBONES,
    Backbone,
    GateWire,
    create_model,
    cifar_preact_resnet,
    cifar_resnet,
)

ROWS = sorted(name for table in paper.TABLES.values() for name in table)


def _load(name):
  return importlib.import_module(f'configs.{name}').get_config()


@pytest.mark.parametrize('name', ROWS)
def test_paper_table_counts(name):
  """Gated filters exactly, params within 0.01M (Table 1) or 1% (2-3)."""
  s = summary.model_summary(_load(name))
  gated = next(t[name][0] for t in paper.TABLES.values() if name in t)
  assert s['gated_filters'] == gated
  assert s['params_total'] == s['params_backbone'] + s['params_gater']
  assert paper.within_tolerance(name, s['params_total'] / 1e6), (
      name,
      s['params_total'] / 1e6,
      paper.expected(name),
  )


@pytest.mark.parametrize('depth,sites', [(20, 9), (56, 27), (110, 54)])
def test_basic_gate_spec(depth, sites):
  spec = cifar_resnet(depth=depth).gate_spec()
  n = (depth - 2) // 6
  assert len(spec) == sites
  assert spec.total == 16 * n + 32 * n + 64 * n
  assert (
      spec.names[0] == 'stage1_block1' and spec.names[-1] == f'stage3_block{n}'
  )


def test_resnet164_gate_spec_and_bad_depth():
  spec = cifar_preact_resnet(depth=164).gate_spec()
  assert len(spec) == 54 and spec.total == 7200
  assert spec.sizes[:18] == (16,) * 18 and spec.sizes[-1] == 256
  with pytest.raises(ValueError, match='6n\\+2'):
    cifar_resnet(depth=21)
  with pytest.raises(ValueError, match='9n\\+2'):
    cifar_preact_resnet(depth=21)


def _tiny_cfg(gated=True, block='cifar_resnet'):
  widths = (4, 8, 16) if block == 'cifar_resnet' else ((2, 4), (4, 8), (4, 8))
  depth = 8 if block == 'cifar_resnet' else 11
  return ml_collections.ConfigDict(
      dict(
          gating='gater' if gated else 'none',
          dtype='float32',
          backbone=dict(name=block, depth=depth, widths=widths, se_reduction=0),
          gater=dict(
              name='cifar_resnet',
              depth=8,
              widths=(4, 8, 8),
              bottleneck=4,
              batchnorm=True,
          ),
          semhash=dict(mix_prob=0.5, noise_std=1.0, binarize='paper'),
      )
  )


@pytest.mark.parametrize('block', ['cifar_resnet', 'cifar_preact_resnet'])
def test_gaternet_apply_returns_logits_and_gate_pytree(block):
  model = create_model(_tiny_cfg(True, block), num_classes=7)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  variables = jax.jit(
      lambda x: model.init(
          {'params': jax.random.key(1), 'gates': jax.random.key(2)}, x
      )
  )(x)
  spec = model.gate_spec()
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  logits, out = apply(variables, x, train=False)
  gates = out['gates']
  assert logits.shape == (3, 7)
  assert set(gates) == set(spec.names)
  for name, n in spec:
    assert gates[name].shape == (3, n)
    assert set(np.unique(gates[name])) <= {0.0, 1.0}
  (logits_t, out_t), new_state = apply(
      variables,
      x,
      train=True,
      rngs={'gates': jax.random.key(3)},
      mutable=('batch_stats',),
  )
  assert logits_t.shape == (3, 7) and 'batch_stats' in new_state
  assert set(out_t['gates']) == set(spec.names)
  # The gater's output size comes from the backbone's spec.
  assert variables['params']['gater']['fc2']['kernel'].shape[-1] == spec.total


@pytest.mark.parametrize('block', ['cifar_resnet', 'cifar_preact_resnet'])
def test_gates_mask_backbone_channels(block):
  model = create_model(_tiny_cfg(False, block), num_classes=5)
  backbone = model.backbone
  spec = backbone.gate_spec()
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(lambda x: backbone.init(jax.random.key(1), x, None))(x)
  apply = jax.jit(lambda *args: backbone.apply(*args)[0])
  plain = apply(variables, x, None)
  # All-open gates compute the dense (ungated) function.
  np.testing.assert_allclose(
      apply(variables, x, spec.ones(2)), plain, atol=1e-6
  )
  # Closing one site's gates changes the output; closing them for one sample
  # changes only that sample's output.
  closed = spec.ones(2)
  last = spec.names[-1]
  closed[last] = closed[last].at[0].set(0.0)
  out = apply(variables, x, closed)
  assert not np.allclose(out[0], plain[0], atol=1e-4)
  np.testing.assert_allclose(out[1], plain[1], atol=1e-6)


def test_baseline_returns_empty_gates_and_shares_backbone_names():
  base = create_model(_tiny_cfg(False), num_classes=5)
  gated = create_model(_tiny_cfg(True), num_classes=5)
  x = jnp.zeros((2, 16, 16, 3))
  vb = jax.eval_shape(lambda: base.init(jax.random.key(0), x))
  vg = jax.eval_shape(
      lambda: gated.init(
          {'params': jax.random.key(0), 'gates': jax.random.key(1)}, x
      )
  )
  assert set(vb['params']) == {'backbone'}
  assert set(vg['params']) == {'backbone', 'gater'}
  assert jax.tree_util.tree_structure(
      vb['params']['backbone']
  ) == jax.tree_util.tree_structure(vg['params']['backbone'])
  _, out = jax.jit(base.apply)(vb_real := base.init(jax.random.key(0), x), x)
  assert out == {'gates': {}} and 'backbone' in vb_real['params']


def test_se_block_rescales_site():
  cfg = _tiny_cfg(False)
  cfg.backbone.se_reduction = 2
  model = create_model(cfg, num_classes=5)
  v = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  )
  blk = v['params']['backbone']['stage3_block1']
  assert blk['se']['fc1']['kernel'].shape == (16, 8)
  assert blk['se']['fc2']['kernel'].shape == (8, 16)


def test_unknown_backbone_is_a_clear_error():
  cfg = _tiny_cfg()
  cfg.backbone.name = 'vgg'
  with pytest.raises(ValueError, match='Unknown backbone'):
    create_model(cfg, 10)


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_every_backbone_implements_the_contract(name):
  """models/backbone.py: the spec, the wiring as GateWire entries for every
  site, and whether units can gate themselves."""
  backbone = BACKBONES[name](num_classes=10)
  assert isinstance(backbone, Backbone)
  spec = backbone.gate_spec()
  wiring = backbone.gate_wiring()
  assert set(wiring) == set(spec.names) and spec.total > 0
  assert all(
      isinstance(w, GateWire) and w.side in ('in', 'out')
      for wires in wiring.values()
      for w in wires
  )
  assert backbone.local_gating is None
  assert backbone.supports_local_gating == name.endswith('resnet')
