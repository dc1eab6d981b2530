"""DenseNet-BC and Shake-Shake backbones: gate specs, Table 2's counts,
forward shapes, gate masking and the shake-shake regularisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax.models.densenet import DenseLayer, densenet_bc
from gaternet_jax.models.resnet_cifar import cifar_resnet
from gaternet_jax.models.shakeshake import Branch, shake, shake_shake

# GaterNet Table 2: (gated filters, baseline params M, gated params M).
TABLE2_DENSENET = {(100, 12): (540, 0.77, 1.05),
                   (250, 24): (2880, 15.32, 15.62),
                   (190, 40): (3600, 25.62, 25.93)}
TABLE2_SHAKE = {64: (3584, 11.71, 12.01), 96: (5376, 26.33, 26.65)}


def _count(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _num_params(model, size: int = 32) -> int:
  """Parameters of `model`, traced on one `(1, size, size, 3)` image."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  return _count(variables['params'])


@pytest.fixture(scope='module')
def gater_params():
  """`num_gates -> params` of the ResNet-20 gater (bottleneck 8, with BN)."""
  features = _num_params(cifar_resnet(depth=20, num_classes=None))
  # FC1 64->8 (+bias), BN(8) scale and bias, FC2 8->c (+bias).
  return lambda c: features + (64 * 8 + 8) + 2 * 8 + (8 * c + c)


def _assert_millions(count: int, reported: float, rel: float):
  assert abs(count / 1e6 - reported) <= rel * reported, (count, reported)


# ------------------------------------------------------------- DenseNet-BC


@pytest.mark.parametrize('depth,k', sorted(TABLE2_DENSENET))
def test_densenet_gate_spec(depth, k):
  spec = densenet_bc(depth=depth, growth_rate=k).gate_spec()
  n = (depth - 4) // 6
  assert spec.total == TABLE2_DENSENET[depth, k][0]
  assert len(spec) == 3 * (n - 1) and set(spec.sizes) == {k}
  # Each block's first layer is not a site.
  assert spec.names[0] == 'block1_layer02'
  assert spec.names[n - 2] == f'block1_layer{n:02d}'
  assert spec.names[n - 1] == 'block2_layer02'
  assert spec.names[-1] == f'block3_layer{n:02d}'


@pytest.mark.parametrize('depth,k', sorted(TABLE2_DENSENET))
def test_densenet_params_match_table2(depth, k, gater_params):
  # eval_shape only: the size of the input does not change the count.
  model = densenet_bc(depth=depth, growth_rate=k)
  params = _num_params(model, size=8)
  gated, base_m, gated_m = TABLE2_DENSENET[depth, k]
  # The standard DenseNet-BC counts round to the printed numbers.
  assert round(params / 1e6, 2) == base_m, params
  assert round((params + gater_params(gated)) / 1e6, 2) == gated_m
  # The factory's defaults are DenseNet-BC (L=100, k=12) on CIFAR-10.
  if (depth, k) == (100, 12):
    assert params == 769_162 and _num_params(densenet_bc(), 8) == params


def test_densenet_bad_args():
  with pytest.raises(ValueError, match='6n\\+4'):
    densenet_bc(depth=101)
  with pytest.raises(ValueError, match='compression'):
    densenet_bc(depth=16, compression=0.0)


# A tiny DenseNet-BC: two layers per block (one gated), k = 4, 16x16 inputs.
TINY_DENSE = dict(depth=16, growth_rate=4)


def _init(model, x):
  return jax.jit(lambda x: model.init(jax.random.key(1), x, None))(x)


def test_densenet_forward_shapes():
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  model = densenet_bc(num_classes=7, **TINY_DENSE)
  logits = jax.jit(model.apply)(_init(model, x), x)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  feats = densenet_bc(num_classes=None, **TINY_DENSE)
  # 2k stem + 2k new maps = 16 -> transition 8 -> 16 -> 8 -> 16 channels.
  out = jax.jit(feats.apply)(_init(feats, x), x)
  assert out.shape == (3, 16) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_densenet_gates_mask_new_maps_before_concat():
  model = densenet_bc(num_classes=5, **TINY_DENSE)
  spec = model.gate_spec()
  assert spec.names == ('block1_layer02', 'block2_layer02', 'block3_layer02')
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _init(model, x)

  @jax.jit
  def run(gates):
    # Each DenseLayer's output (its k new maps) is recorded as intermediate.
    return model.apply(variables, x, gates, capture_intermediates=(
        lambda m, _: isinstance(m, DenseLayer)), mutable=('intermediates',))

  plain, plain_maps = run(None)
  ones, _ = run(spec.ones(2))
  np.testing.assert_allclose(ones, plain, atol=1e-6)
  for site in spec.names:
    closed = spec.ones(2)
    closed[site] = closed[site].at[0].set(0.0)
    out, maps = run(closed)
    new = maps['intermediates'][site]['__call__'][0]
    # The site's k new maps are zero for sample 0 only, so every later
    # layer sees zeros in those concatenated channels.
    side = 16 // 2 ** (int(site[len('block')]) - 1)
    assert new.shape == (2, side, side, TINY_DENSE['growth_rate'])
    np.testing.assert_array_equal(new[0], 0.0)
    np.testing.assert_allclose(
        new[1], plain_maps['intermediates'][site]['__call__'][0][1],
        atol=1e-6)
    assert not np.allclose(out[0], plain[0], atol=1e-5)
    np.testing.assert_allclose(out[1], plain[1], atol=1e-6)


# ------------------------------------------------------------- Shake-Shake


@pytest.mark.parametrize('width', sorted(TABLE2_SHAKE))
def test_shake_shake_gate_spec(width):
  spec = shake_shake(width=width).gate_spec()
  assert spec.total == TABLE2_SHAKE[width][0]
  assert len(spec) == 24
  assert spec.names[:3] == ('stage1_block1_branch1', 'stage1_block1_branch2',
                            'stage1_block2_branch1')
  assert spec.names[-1] == 'stage3_block4_branch2'
  assert spec.sizes == (width,) * 8 + (2 * width,) * 8 + (4 * width,) * 8


@pytest.mark.parametrize('width', sorted(TABLE2_SHAKE))
def test_shake_shake_params_match_table2(width, gater_params):
  gated, base_m, gated_m = TABLE2_SHAKE[width]
  # Gastaldi's architecture (16-channel first conv): his 11.7M / 26.2M,
  # within 1% of Table 2's 11.71M / 26.33M.
  standard = _num_params(shake_shake(width=width), size=8)
  assert standard == {64: 11_653_978, 96: 26_192_922}[width]
  _assert_millions(standard, base_m, 0.01)
  _assert_millions(standard + gater_params(gated), gated_m, 0.01)
  # The first conv straight to `width` channels gives Table 2's numbers.
  stem = _num_params(shake_shake(width=width, stem_width=width), size=8)
  assert round(stem / 1e6, 2) == base_m, stem
  assert round((stem + gater_params(gated)) / 1e6, 2) == gated_m


def test_shake_shake_bad_args():
  with pytest.raises(ValueError, match='6n\\+2'):
    shake_shake(depth=27)
  with pytest.raises(ValueError, match='even'):
    shake_shake(depth=8, width=5)


# A tiny Shake-Shake: one block per stage, widths 4/8/16, 16x16 inputs.
TINY_SHAKE = dict(depth=8, width=4)


@pytest.fixture(scope='module')
def tiny_shake():
  model = shake_shake(num_classes=5, **TINY_SHAKE)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  return model, x, _init(model, x)


def _train_apply(model, variables, x, rng, gates=None, **kwargs):
  return model.apply(variables, x, gates, train=True, rngs={'dropout': rng},
                     mutable=('batch_stats',), **kwargs)


def test_shake_shake_forward_shapes(tiny_shake):
  model, x, variables = tiny_shake
  assert jax.jit(model.apply)(variables, x).shape == (4, 5)
  feats = shake_shake(num_classes=None, **TINY_SHAKE)
  out = jax.jit(feats.apply)(_init(feats, x), x)
  assert out.shape == (4, 16) and out.dtype == jnp.float32
  # Training needs the 'dropout' stream, and updates the BN statistics.
  logits, state = jax.jit(_train_apply, static_argnums=0)(
      model, variables, x, jax.random.key(2))
  assert logits.shape == (4, 5) and 'batch_stats' in state


def test_shake_shake_gates_mask_branches(tiny_shake):
  model, x, variables = tiny_shake
  spec = model.gate_spec()
  assert spec.total == 2 * (4 + 8 + 16)
  run = jax.jit(model.apply)
  plain = run(variables, x, None)
  np.testing.assert_allclose(run(variables, x, spec.ones(4)), plain,
                             atol=1e-6)
  for site in ('stage1_block1_branch1', 'stage3_block1_branch2'):
    closed = spec.ones(4)
    closed[site] = closed[site].at[2].set(0.0)
    out = run(variables, x, closed)
    assert not np.allclose(out[2], plain[2], atol=1e-5)
    rest = np.array([0, 1, 3])
    np.testing.assert_allclose(out[rest], plain[rest], atol=1e-6)


def _block_parts(model, variables, x, train, rng=None):
  """`{block: (output, shortcut, branch1, branch2)}` as computed in `apply`.

  The shortcut is None for identity shortcuts (none in the tiny network).
  """
  def keep(m, _):
    return m.name is not None and (
        m.name.startswith('stage') or
        m.name in ('branch1', 'branch2', 'shortcut'))
  if train:
    _, state = model.apply(variables, x, None, train=True,
                           rngs={'dropout': rng}, capture_intermediates=keep,
                           mutable=('batch_stats', 'intermediates'))
  else:
    _, state = model.apply(variables, x, None, capture_intermediates=keep,
                           mutable=('intermediates',))
  parts = {}
  for name, block in state['intermediates'].items():
    if name.startswith('stage'):
      short = block['shortcut']['__call__'][0] if 'shortcut' in block else None
      parts[name] = (block['__call__'][0], short,
                     block['branch1']['__call__'][0],
                     block['branch2']['__call__'][0])
  return parts


def _per_sample_coefficient(num, den):
  """The least-squares c per sample of num ~= c * den: `(batch,)`."""
  num, den = np.asarray(num), np.asarray(den)
  axes = tuple(range(1, num.ndim))
  return np.sum(num * den, axis=axes) / np.sum(den * den, axis=axes)


def test_shake_shake_eval_is_deterministic_mean(tiny_shake):
  model, x, variables = tiny_shake
  run = jax.jit(model.apply)  # No rng needed in evaluation.
  np.testing.assert_array_equal(run(variables, x), run(variables, x))
  parts = jax.jit(lambda v, x: _block_parts(model, v, x, False))(variables, x)
  assert sorted(parts) == ['stage1_block1', 'stage2_block1', 'stage3_block1']
  for out, short, a, b in parts.values():
    # Every block of the tiny net changes shape, so all have a shortcut.
    np.testing.assert_allclose(out, short + 0.5 * (a + b), atol=1e-5)


def test_shake_shake_training_forward_is_per_sample_random(tiny_shake):
  model, x, variables = tiny_shake
  run = jax.jit(_train_apply, static_argnums=0)
  l1, _ = run(model, variables, x, jax.random.key(1))
  l1_again, _ = run(model, variables, x, jax.random.key(1))
  l2, _ = run(model, variables, x, jax.random.key(2))
  np.testing.assert_array_equal(l1, l1_again)
  assert not np.allclose(l1, l2, atol=1e-5)
  parts = jax.jit(lambda v, x, r: _block_parts(model, v, x, True, r))(
      variables, x, jax.random.key(1))
  alphas = []
  for out, short, a, b in parts.values():
    # out - shortcut - b = alpha * (a - b), one alpha per sample.
    alpha = _per_sample_coefficient(out - short - b, a - b)
    np.testing.assert_allclose(out - short - b,
                               alpha[:, None, None, None] * (a - b),
                               atol=1e-4)
    assert np.all((alpha >= 0) & (alpha <= 1)), alpha
    alphas.append(alpha)
  alphas = np.stack(alphas)  # (block, sample)
  # Drawn per sample and per block, not once for the batch or the network.
  assert np.ptp(alphas, axis=1).min() > 1e-3, alphas
  assert np.ptp(alphas, axis=0).min() > 1e-3, alphas


def test_shake_custom_gradient_uses_beta():
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a = jax.random.normal(ka, (3, 2, 2, 5))
  b = jax.random.normal(kb, (3, 2, 2, 5))
  cot = jax.random.normal(kg, (3, 2, 2, 5))
  alpha = jnp.array([0.1, 0.5, 0.8]).reshape(3, 1, 1, 1)
  beta = jnp.array([0.7, 0.2, 0.4]).reshape(3, 1, 1, 1)
  out, vjp = jax.vjp(shake, a, b, alpha, beta)
  np.testing.assert_allclose(out, alpha * a + (1 - alpha) * b, rtol=1e-6)
  da, db, dalpha, dbeta = vjp(cot)
  np.testing.assert_allclose(da, beta * cot, rtol=1e-6)
  np.testing.assert_allclose(db, (1 - beta) * cot, rtol=1e-6)
  assert not np.allclose(da, alpha * cot)
  np.testing.assert_array_equal(dalpha, 0.0)
  np.testing.assert_array_equal(dbeta, 0.0)
  # bfloat16 branches: the cotangents keep the branches' dtype.
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out16, vjp16 = jax.vjp(shake, a16, b16, alpha, beta)
  da16, db16, _, _ = vjp16(cot.astype(jnp.bfloat16))
  assert out16.dtype == da16.dtype == db16.dtype == jnp.bfloat16


def test_shake_block_gradient_wrt_branches_is_beta(tiny_shake):
  """In the model, d block / d branch output is beta * g, not alpha * g."""
  model, x, variables = tiny_shake
  site = 'stage2_block1'  # Input (4, 16, 16, 4); strided: branches 8x8x8.
  shape = (4, 8, 8, 8)

  def block_out(deltas):
    # Adds `deltas` to the branch outputs of `site`: the block output's
    # gradient wrt them is what the shake passes back to the branches.
    def add_delta(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      m = context.module
      if (context.method_name == '__call__' and isinstance(m, Branch) and
          m.scope.path[-2] == site):
        y = y + deltas[m.name]
      return y
    with nn.intercept_methods(add_delta):
      parts = _block_parts(model, variables, x, True, jax.random.key(3))
    return parts[site][0], parts[site]

  @jax.jit
  def grads_and_parts(cot):
    zeros = {'branch1': jnp.zeros(shape), 'branch2': jnp.zeros(shape)}
    _, vjp, parts = jax.vjp(block_out, zeros, has_aux=True)
    return vjp(cot)[0], parts

  cot = jax.random.normal(jax.random.key(4), shape)
  grads, (out, short, a, b) = grads_and_parts(cot)
  alpha = _per_sample_coefficient(out - short - b, a - b)
  beta = _per_sample_coefficient(grads['branch1'], cot)
  beta4 = beta[:, None, None, None]
  np.testing.assert_allclose(grads['branch1'], beta4 * cot, atol=1e-5)
  np.testing.assert_allclose(grads['branch2'], (1 - beta4) * cot, atol=1e-5)
  assert np.all((beta >= 0) & (beta <= 1)), beta
  # Independent draws: the backward coefficient is not the forward one.
  assert np.min(np.abs(beta - alpha)) > 1e-3, (alpha, beta)
