"""Inception-v4: gate sites (16,608), shapes at 299, Table 3's counts,
gating and dropout semantics.

The full-size network is only traced (`jax.eval_shape`). Real, jitted
forward passes run on single blocks at `width=1/8` on 7x7 inputs and on the
whole network at `width=1/16` on 75x75 inputs, with parameters drawn by
numpy from the traced shapes: flax's own init of ~150 convs spends minutes
compiling its random initialisers on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax.models import inception_v4 as iv

PAPER_GATED_FILTERS = 16_608
PAPER_PARAMS = 44.50e6  # Table 3, Inception-v4
PAPER_PARAMS_GATED = 61.67e6  # Table 3, Inception-v4-Gated
# The gater of Table 3's ResNet rows: ResNet-18 without its fc, FC 512->256,
# BN (scale and bias), FC 256->16,608.
GATER_PARAMS = (
    11_176_512
    + (512 * 256 + 256)
    + 2 * 256
    + (256 * PAPER_GATED_FILTERS + PAPER_GATED_FILTERS)
)


def _count(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _abstract(model, size=299, batch=1):
  """`(logits, variables)` of `model.init_with_output`, traced only."""
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x
  )


def _numpy_variables(shapes, seed=0):
  """Variables of the traced `shapes`: He-normal kernels, unit BN stats."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(
          rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in), s.dtype
      )
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_gate_spec_gives_the_papers_16608_filters():
  spec = iv.InceptionV4().gate_spec()
  assert spec.total == PAPER_GATED_FILTERS
  assert spec.names == (
      'Mixed_3a',
      'Mixed_4a',
      'Mixed_5a',
      'Mixed_5b',
      'Mixed_5c',
      'Mixed_5d',
      'Mixed_5e',
      'Mixed_6a',
      'Mixed_6b',
      'Mixed_6c',
      'Mixed_6d',
      'Mixed_6e',
      'Mixed_6f',
      'Mixed_6g',
      'Mixed_6h',
      'Mixed_7a',
      'Mixed_7b',
      'Mixed_7c',
      'Mixed_7d',
  )
  assert spec.sizes == (
      (160, 192, 384)
      + (384,) * 4
      + (1024,)
      + (1024,) * 7
      + (1536,)
      + (1536,) * 3
  )
  # Every block's output concatenation: 736 (stem) + 1,536 (A) + 1,024
  # (Red-A) + 7,168 (B) + 1,536 (Red-B) + 4,608 (C).
  assert sum(spec.sizes[:3]) == 736 and spec.sizes[7] + spec.sizes[15] == 2560


def test_gate_spec_scales_with_width():
  spec = iv.InceptionV4(width=0.125).gate_spec()
  assert spec.names == iv.InceptionV4().gate_spec().names
  assert spec.sizes[:3] == (8 + 12, 24, 24 + 24)
  assert spec.sizes[-1] == 6 * 32


@pytest.fixture(scope='module')
def traced():
  """Traced variables of the default model and of the one with aux head."""
  out = {}
  for aux in (False, True):
    model = iv.inception_v4(num_classes=1000, aux_logits=aux)
    out[aux] = _abstract(model)[1]
  return out


def _x(size=299, batch=2):
  return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)


def test_shapes_at_299_and_gate_sites_match_the_network(traced):
  variables = traced[False]
  model = iv.inception_v4(num_classes=1000)
  spec = model.gate_spec()
  assert set(variables) == {'params', 'batch_stats'}
  assert set(spec.names) <= set(variables['params'])
  # Passing gates runs apply_site's check of every site's channel count.
  logits, _ = jax.eval_shape(model.apply, variables, _x(), spec.ones(2))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  # Features: the same network without its fc (unused params are ignored),
  # at 75x75, the smallest input whose final grid is not empty.
  features, _ = jax.eval_shape(
      iv.inception_v4(num_classes=None).apply, variables, _x(75)
  )
  assert features.shape == (2, 1536) and features.dtype == jnp.float32


# Exact trainable counts at 1000 classes; Table 3 says 44.50M (see the
# module docstring: no variant of Inception-v4 gives it).
COUNTS = {
    (False, False): 42_648_232,  # TF-slim's network (BN without gamma)
    (False, True): 42_679_816,
    (True, False): 46_006_800,  # + the auxiliary head
    (True, True): 46_039_280,
}


def test_param_counts(traced):
  for aux in (False, True):
    params = traced[aux]['params']
    assert _count(params) == COUNTS[aux, False]
    assert ('AuxLogits' in params) == aux
    # BN with scale adds one gamma per BN channel, i.e. per running mean.
    num_bn = _count(traced[aux]['batch_stats']) // 2
    assert _count(params) + num_bn == COUNTS[aux, True]
  _, variables = _abstract(iv.inception_v4(aux_logits=True, bn_scale=True))
  assert _count(variables['params']) == COUNTS[True, True]
  assert _count(variables['params']) - COUNTS[False, True] == (
      1024 * 128 + 2 * 128 + 5 * 5 * 128 * 768 + 2 * 768 + 768 * 1000 + 1000
  )


def test_table3_arithmetic_documented_in_the_module():
  assert GATER_PARAMS == 15_576_608
  # 44.50M + the ResNet rows' gater is 60.08M, not the reported 61.67M ...
  assert round((PAPER_PARAMS + GATER_PARAMS) / 1e6, 2) == 60.08
  # ... which our network with its auxiliary head comes within 0.06M of.
  assert abs(COUNTS[True, True] + GATER_PARAMS - PAPER_PARAMS_GATED) < 0.06e6
  assert abs(COUNTS[True, False] + GATER_PARAMS - PAPER_PARAMS_GATED) < 0.09e6
  # And no variant is within 1M of the baseline's 44.50M.
  for n in COUNTS.values():
    assert abs(n - PAPER_PARAMS) > 1e6


def test_train_mode_needs_dropout_rng_and_returns_aux_logits(traced):
  model = iv.inception_v4(num_classes=1000, aux_logits=True)
  variables = traced[True]

  def train(v, x, rngs):
    return model.apply(
        v, x, train=True, rngs=rngs, mutable=['batch_stats', 'intermediates']
    )

  (logits, extras), state = jax.eval_shape(
      lambda v, x: train(v, x, {'dropout': jax.random.key(1)}), variables, _x()
  )
  assert logits.shape == (2, 1000)
  aux = extras['aux_logits']
  assert aux.shape == (2, 1000) and aux.dtype == jnp.float32
  # Nothing travels through 'intermediates' any more.
  assert 'intermediates' not in state
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda v, x: train(v, x, {}), variables, _x())
  # Evaluation needs no rng and sows nothing.
  (logits, extras), state = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, _x()
  )
  assert logits.shape == (2, 1000) and not state and not extras


WIDTH = 0.125
_SPEC = iv.InceptionV4(width=WIDTH).gate_spec()
_IN = dict(
    zip(_SPEC.names[1:], _SPEC.sizes[:-1]), Mixed_3a=iv.ConvConfig(WIDTH).ch(64)
)
BLOCKS = [
    (iv.Mixed3a, 'Mixed_3a'),
    (iv.Mixed4a, 'Mixed_4a'),
    (iv.Mixed5a, 'Mixed_5a'),
    (iv.InceptionA, 'Mixed_5b'),
    (iv.ReductionA, 'Mixed_6a'),
    (iv.InceptionB, 'Mixed_6b'),
    (iv.ReductionB, 'Mixed_7a'),
    (iv.InceptionC, 'Mixed_7b'),
]


@pytest.mark.parametrize('cls,site', BLOCKS, ids=[s for _, s in BLOCKS])
def test_block_gating(cls, site):
  """All-ones gates == no gates; one sample's gates touch only that sample."""
  block = cls(iv.ConvConfig(WIDTH))
  batch, filters = 3, dict(_SPEC)[site]
  x = np.random.default_rng(1).normal(size=(batch, 7, 7, _IN[site]))
  x = jnp.asarray(x, jnp.float32)
  shapes = jax.eval_shape(
      lambda x: block.init(jax.random.key(0), x, None, train=False), x
  )
  variables = _numpy_variables(shapes)
  mask = np.ones((batch, filters), np.float32)
  mask[0] = np.random.default_rng(2).integers(0, 2, filters)
  mask[0, :2] = 0.0

  @jax.jit
  def run(variables, x, mask):
    apply = lambda g: block.apply(variables, x, g, train=False)
    return apply(None), apply(jnp.ones_like(mask)), apply(mask)

  dense, ones, masked = run(variables, x, jnp.asarray(mask))
  assert dense.shape[0] == batch and dense.shape[-1] == filters
  np.testing.assert_array_equal(ones, dense)
  np.testing.assert_array_equal(masked[1:], dense[1:])
  np.testing.assert_allclose(masked[0], dense[0] * mask[0], rtol=0, atol=0)
  assert np.abs(np.asarray(dense[0]) * (1 - mask[0])).max() > 0


def test_dropout_only_in_training():
  head = iv.Head(num_classes=5, dropout_rate=0.5)
  x = jnp.asarray(
      np.random.default_rng(0).normal(size=(4, 3, 3, 64)), jnp.float32
  )
  variables = _numpy_variables(
      jax.eval_shape(lambda x: head.init(jax.random.key(0), x, train=False), x)
  )

  @jax.jit
  def run(variables, x, k1, k2):
    evaluate = head.apply(variables, x, train=False)
    t1 = head.apply(variables, x, train=True, rngs={'dropout': k1})
    t2 = head.apply(variables, x, train=True, rngs={'dropout': k2})
    t1_again = head.apply(variables, x, train=True, rngs={'dropout': k1})
    return evaluate, t1, t2, t1_again

  evaluate, t1, t2, t1_again = run(
      variables, x, jax.random.key(1), jax.random.key(2)
  )
  # Evaluation is deterministic and dropout-free: the plain pooled fc.
  pooled = np.asarray(x).mean(axis=(1, 2))
  p = variables['params']['Logits']
  np.testing.assert_allclose(
      evaluate,
      pooled @ np.asarray(p['kernel']) + np.asarray(p['bias']),
      rtol=1e-5,
      atol=1e-5,
  )
  assert not np.allclose(t1, evaluate)
  assert not np.allclose(t1, t2)
  np.testing.assert_array_equal(t1, t1_again)
  # Logits are float32 whatever the compute dtype.
  half = iv.Head(num_classes=5, dtype=jnp.bfloat16).apply(
      variables, x, train=False
  )
  assert half.dtype == jnp.float32
  # Rate 0 makes training equal to evaluation and needs no rng.
  no_drop = iv.Head(num_classes=5, dropout_rate=0.0)
  np.testing.assert_allclose(
      no_drop.apply(variables, x, train=True), evaluate, rtol=1e-6, atol=1e-6
  )


def test_factory_validates_arguments():
  assert isinstance(
      iv.inception_v4(num_classes=10, dtype=jnp.float32, aux_logits=True),
      iv.InceptionV4,
  )
  with pytest.raises(ValueError, match='width'):
    iv.inception_v4(width=0.0)
  with pytest.raises(ValueError, match='dropout_rate'):
    iv.inception_v4(dropout_rate=1.0)


def test_small_network_end_to_end():
  """A real, jitted forward pass of the whole network at width 1/16, 75x75.

  Both samples are the same image; sample 0's last concatenation is gated
  off entirely, so its pooled features are 0 and its logits the fc's bias.
  """
  model = iv.inception_v4(num_classes=4, width=1 / 16)
  spec = model.gate_spec()
  image = np.random.default_rng(3).normal(size=(1, 75, 75, 3))
  x = jnp.asarray(np.concatenate([image, image]), jnp.float32)
  variables = _numpy_variables(
      jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  )
  gates = spec.ones(2)
  gates['Mixed_7d'] = gates['Mixed_7d'].at[0].set(0.0)
  logits, _ = jax.jit(model.apply)(variables, x, gates)
  assert logits.shape == (2, 4) and np.all(np.isfinite(logits))
  bias = variables['params']['Logits']['Logits']['bias']
  np.testing.assert_allclose(logits[0], bias, rtol=0, atol=1e-6)
  assert np.abs(logits[1] - bias).max() > 1e-3
