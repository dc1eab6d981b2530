"""DenseNet-BC and Shake-Shake backbones: gate specs, Table 2's counts,
forward shapes, gate masking and the shake-shake regularisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax.models.densenet import DenseLayer, densenet_bc
from gaternet_jax.models.gaternet import Gater
from gaternet_jax.models.resnet_cifar import cifar_resnet
from gaternet_jax.models.shakeshake import (
    Branch,
    ShakeBlock,
    shake,
    shake_shake,
)

# GaterNet Table 2: (gated filters, baseline params M, gated params M).
TABLE2_DENSENET = {
    (100, 12): (540, 0.77, 1.05),
    (250, 24): (2880, 15.32, 15.62),
    (190, 40): (3600, 25.62, 25.93),
}
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
  """`num_gates -> params` of Table 2's gater: ResNet-20, bottleneck 8, BN."""
  features = _num_params(cifar_resnet(depth=20, num_classes=None))
  assert features == 272_474 - (64 * 10 + 10)  # ResNet-20 without its fc.

  def count(c):
    # FC1 64->8 (+bias), BN(8) scale and bias, FC2 8->c (+bias).
    return features + (64 * 8 + 8) + 2 * 8 + (8 * c + c)

  gater = Gater(
      features=cifar_resnet(depth=20, num_classes=None),
      num_gates=540,
      bottleneck=8,
      batchnorm=True,
  )
  assert _num_params(gater) == count(540)
  return count


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
  if (depth, k) == (100, 12):
    assert params == 769_162  # As the reference PyTorch implementations.


def test_densenet_factory_defaults():
  # DenseNet-BC (L=100, k=12, theta=0.5) for CIFAR-10.
  model = densenet_bc()
  assert (
      model.layers_per_block,
      model.growth_rate,
      model.compression,
      model.bottleneck_factor,
      model.num_classes,
  ) == (16, 12, 0.5, 4, 10)


def test_densenet_bad_args():
  with pytest.raises(ValueError, match='6n\\+4'):
    densenet_bc(depth=101)
  with pytest.raises(ValueError, match='compression'):
    densenet_bc(depth=16, compression=0.0)


# A tiny DenseNet-BC: two layers per block (one gated), k = 4, 16x16 inputs.
TINY_DENSE = dict(depth=16, growth_rate=4)


def _random_variables(model, *args, seed: int = 0, **kwargs):
  """`model.init(rng, *args, **kwargs)`'s variables filled from NumPy.

  He-normal kernels, BN scales and variances near 1: on CPU, compiling
  `init`'s random initialisers costs more than the tests' forward passes.
  """
  shapes = jax.eval_shape(
      lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.8, 1.2, shape)
    else:  # Biases and BN means.
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _capture(model, variables, keep):
  """Jitted `(x, gates) -> (logits, intermediates)`, evaluation mode."""

  @jax.jit
  def run(x, gates):
    (logits, _), state = model.apply(
        variables,
        x,
        gates,
        capture_intermediates=keep,
        mutable=('intermediates',),
    )
    return logits, state['intermediates']

  return run


@pytest.fixture(scope='module')
def tiny_dense():
  model = densenet_bc(num_classes=5, **TINY_DENSE)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _random_variables(model, x, None)
  # Each DenseLayer's output (its k new maps) is recorded.
  run = _capture(model, variables, lambda m, _: isinstance(m, DenseLayer))
  return model, x, variables, run


def test_densenet_forward_shapes(tiny_dense):
  model, x, variables, run = tiny_dense
  logits, maps = run(x, None)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert len(maps) == 6  # 3 blocks x 2 layers, gated or not.
  feats = densenet_bc(num_classes=None, **TINY_DENSE)
  out, _ = jax.eval_shape(feats.apply, variables, x)
  # 2k stem + 2k new maps = 16 -> transition 8 -> 16 -> 8 -> 16 channels.
  assert out.shape == (2, 16) and out.dtype == jnp.float32
  bf16 = densenet_bc(num_classes=5, dtype=jnp.bfloat16, **TINY_DENSE)
  assert jax.eval_shape(bf16.apply, variables, x)[0].dtype == jnp.float32


def test_densenet_gates_mask_new_maps_before_concat(tiny_dense):
  model, x, _, run = tiny_dense
  spec = model.gate_spec()
  assert spec.names == ('block1_layer02', 'block2_layer02', 'block3_layer02')
  plain, plain_maps = run(x, None)
  ones, _ = run(x, spec.ones(2))
  np.testing.assert_allclose(ones, plain, atol=1e-5)
  for site in spec.names:
    closed = spec.ones(2)
    closed[site] = closed[site].at[0].set(0.0)
    out, maps = run(x, closed)
    new = maps[site]['__call__'][0]
    side = 16 // 2 ** (int(site[len('block')]) - 1)
    assert new.shape == (2, side, side, TINY_DENSE['growth_rate'])
    # The site's k new maps are zero for sample 0 only, and they are what
    # the later layers see concatenated: sample 0's output changes.
    np.testing.assert_array_equal(new[0], 0.0)
    np.testing.assert_allclose(
        new[1], plain_maps[site]['__call__'][0][1], atol=1e-5
    )
    assert not np.allclose(out[0], plain[0], atol=1e-4)
    np.testing.assert_allclose(out[1], plain[1], atol=1e-5)


# ------------------------------------------------------------- Shake-Shake


@pytest.mark.parametrize('width', sorted(TABLE2_SHAKE))
def test_shake_shake_gate_spec(width):
  spec = shake_shake(width=width).gate_spec()
  assert spec.total == TABLE2_SHAKE[width][0]
  assert len(spec) == 24
  assert spec.names[:3] == (
      'stage1_block1_branch1',
      'stage1_block1_branch2',
      'stage1_block2_branch1',
  )
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


def _keep_block_parts(m, _):
  """Capture filter: each block, its two branches and its shortcut."""
  return m.name is not None and (
      m.name.startswith('stage') or m.name in ('branch1', 'branch2', 'shortcut')
  )


def _block_parts(intermediates):
  """`{block: (output, shortcut, branch1, branch2)}` from the captures.

  Every block of the tiny network changes shape, so all have a shortcut.
  """

  def out(tree):
    return tree['__call__'][0]

  return {
      name: (out(b), out(b['shortcut']), out(b['branch1']), out(b['branch2']))
      for name, b in intermediates.items()
      if name.startswith('stage')
  }


@pytest.fixture(scope='module')
def tiny_shake():
  """(model, x, variables, eval run, train run), the runs jitted once."""
  model = shake_shake(num_classes=5, **TINY_SHAKE)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  variables = _random_variables(model, x, None)
  run_eval = _capture(model, variables, _keep_block_parts)

  @jax.jit
  def run_train(x, rng):
    (logits, _), state = model.apply(
        variables,
        x,
        None,
        train=True,
        rngs={'dropout': rng},
        capture_intermediates=_keep_block_parts,
        mutable=('batch_stats', 'intermediates'),
    )
    return logits, state['intermediates'], state['batch_stats']

  return model, x, variables, run_eval, run_train


def test_shake_shake_forward_shapes(tiny_shake):
  model, x, variables, run_eval, run_train = tiny_shake
  logits, parts = run_eval(x, None)
  assert logits.shape == (4, 5) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert sorted(_block_parts(parts)) == [
      'stage1_block1',
      'stage2_block1',
      'stage3_block1',
  ]
  feats = shake_shake(num_classes=None, **TINY_SHAKE)
  out, _ = jax.eval_shape(feats.apply, variables, x)
  assert out.shape == (4, 16) and out.dtype == jnp.float32
  bf16 = shake_shake(num_classes=5, dtype=jnp.bfloat16, **TINY_SHAKE)
  assert jax.eval_shape(bf16.apply, variables, x)[0].dtype == jnp.float32
  # Training draws from the 'dropout' stream and updates the BN statistics.
  logits_t, _, stats = run_train(x, jax.random.key(2))
  assert logits_t.shape == (4, 5)
  assert jax.tree.structure(stats) == jax.tree.structure(
      variables['batch_stats']
  )
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=('batch_stats',)),
        variables,
        x,
    )


def test_shake_shake_gates_mask_branches(tiny_shake):
  model, x, _, run_eval, _ = tiny_shake
  spec = model.gate_spec()
  assert spec.total == 2 * (4 + 8 + 16)
  plain, _ = run_eval(x, None)
  ones, _ = run_eval(x, spec.ones(4))
  np.testing.assert_allclose(ones, plain, atol=1e-5)
  rest = np.array([0, 1, 3])
  for site in ('stage1_block1_branch1', 'stage3_block1_branch2'):
    closed = spec.ones(4)
    closed[site] = closed[site].at[2].set(0.0)
    out, parts = run_eval(x, closed)
    block, branch = site.rsplit('_', 1)
    # The gate is applied at the branch's output (after its last BN).
    np.testing.assert_array_equal(parts[block][branch]['__call__'][0][2], 0.0)
    assert not np.allclose(out[2], plain[2], atol=1e-4)
    np.testing.assert_allclose(out[rest], plain[rest], atol=1e-5)


def _per_sample_coefficient(num, den):
  """The least-squares c per sample of num ~= c * den: `(batch,)`."""
  num, den = np.asarray(num), np.asarray(den)
  axes = tuple(range(1, num.ndim))
  return np.sum(num * den, axis=axes) / np.sum(den * den, axis=axes)


def test_shake_shake_eval_is_deterministic_mean(tiny_shake):
  _, x, _, run_eval, _ = tiny_shake
  logits, parts = run_eval(x, None)  # No rng: evaluation draws nothing.
  logits_again, _ = run_eval(x, None)
  np.testing.assert_array_equal(logits, logits_again)
  for out, short, a, b in _block_parts(parts).values():
    np.testing.assert_allclose(out, short + 0.5 * (a + b), atol=1e-5)


def test_shake_shake_training_forward_is_per_sample_random(tiny_shake):
  _, x, _, _, run_train = tiny_shake
  l1, parts, _ = run_train(x, jax.random.key(1))
  l1_again, _, _ = run_train(x, jax.random.key(1))
  l2, _, _ = run_train(x, jax.random.key(2))
  np.testing.assert_array_equal(l1, l1_again)
  assert not np.allclose(l1, l2, atol=1e-4)
  alphas = []
  for out, short, a, b in _block_parts(parts).values():
    # out - shortcut - b = alpha * (a - b), one alpha in [0, 1] per sample.
    alpha = _per_sample_coefficient(out - short - b, a - b)
    np.testing.assert_allclose(
        out - short - b, alpha[:, None, None, None] * (a - b), atol=1e-4
    )
    assert np.all((alpha >= 0) & (alpha <= 1)), alpha
    alphas.append(alpha)
  alphas = np.stack(alphas)  # (block, sample)
  # Drawn per sample and per block, not once for the batch or the network.
  assert np.ptp(alphas, axis=1).min() > 1e-3, alphas
  assert np.ptp(alphas, axis=0).min() > 1e-3, alphas


def test_shake_custom_gradient_uses_beta():
  rng = np.random.default_rng(0)
  a, b, cot = (
      rng.normal(size=(3, 2, 2, 5)).astype(np.float32) for _ in range(3)
  )
  alpha = np.array([0.1, 0.5, 0.8], np.float32).reshape(3, 1, 1, 1)
  beta = np.array([0.7, 0.2, 0.4], np.float32).reshape(3, 1, 1, 1)

  @jax.jit
  def forward_and_grads(a, b, cot):
    out, vjp = jax.vjp(shake, a, b, alpha, beta)
    return out, vjp(cot.astype(out.dtype))

  out, (da, db, dalpha, dbeta) = forward_and_grads(a, b, cot)
  np.testing.assert_allclose(out, alpha * a + (1 - alpha) * b, rtol=1e-6)
  np.testing.assert_allclose(da, beta * cot, rtol=1e-6)
  np.testing.assert_allclose(db, (1 - beta) * cot, rtol=1e-6)
  assert not np.allclose(da, alpha * cot)
  np.testing.assert_array_equal(dalpha, 0.0)
  np.testing.assert_array_equal(dbeta, 0.0)
  # bfloat16 branches: output and cotangents keep the branches' dtype.
  out16, (da16, db16, _, _) = jax.eval_shape(
      forward_and_grads, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), cot
  )
  assert out16.dtype == da16.dtype == db16.dtype == jnp.bfloat16


def test_shake_block_gradient_wrt_branches_is_beta():
  """In a block, d output / d branch output is beta * g, not alpha * g."""
  block = ShakeBlock(features=8, stride=2)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 4)).astype(np.float32)
  variables = _random_variables(block, x, None, None, train=False)
  shape = (4, 4, 4, 8)

  def run(deltas):
    # Adds `deltas` to the branch outputs: the block output's gradient wrt
    # them is what the shake passes back to the branches.
    def add_delta(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and isinstance(
          context.module, Branch
      ):
        y = y + deltas[context.module.name]
      return y

    with nn.intercept_methods(add_delta):
      out, state = block.apply(
          variables,
          x,
          None,
          None,
          train=True,
          rngs={'dropout': jax.random.key(3)},
          capture_intermediates=_keep_block_parts,
          mutable=('batch_stats', 'intermediates'),
      )
    parts = state['intermediates']
    return out, (
        out,
        parts['shortcut']['__call__'][0],
        parts['branch1']['__call__'][0],
        parts['branch2']['__call__'][0],
    )

  @jax.jit
  def grads_and_parts(cot):
    zeros = {'branch1': jnp.zeros(shape), 'branch2': jnp.zeros(shape)}
    _, vjp, parts = jax.vjp(run, zeros, has_aux=True)
    return vjp(cot)[0], parts

  cot = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  grads, (out, short, a, b) = grads_and_parts(cot)
  assert out.shape == shape
  alpha = _per_sample_coefficient(out - short - b, a - b)
  np.testing.assert_allclose(
      out - short - b, alpha[:, None, None, None] * (a - b), atol=1e-4
  )
  beta = _per_sample_coefficient(grads['branch1'], cot)
  beta4 = beta[:, None, None, None]
  np.testing.assert_allclose(grads['branch1'], beta4 * cot, atol=1e-5)
  np.testing.assert_allclose(grads['branch2'], (1 - beta4) * cot, atol=1e-5)
  assert np.all((beta >= 0) & (beta <= 1)), beta
  # Independent draws: the backward coefficient is not the forward one.
  assert np.min(np.abs(beta - alpha)) > 1e-3, (alpha, beta)
