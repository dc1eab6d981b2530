"""Improved SemHash and the gate PyTree helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax import gates as gates_lib
from gaternet_jax.gates import GateSpec, improved_semhash, saturating_sigmoid


def _sat_grad(x):
  s = jax.nn.sigmoid(x)
  inside = (1.2 * s - 0.1 > 0) & (1.2 * s - 0.1 < 1)
  return np.where(inside, 1.2 * s * (1 - s), 0.0)


def test_saturating_sigmoid_values():
  x = jnp.array([-10.0, -2.0, 0.0, 2.0, 10.0])
  want = np.clip(1.2 / (1 + np.exp(-np.asarray(x))) - 0.1, 0, 1)
  np.testing.assert_allclose(saturating_sigmoid(x), want, rtol=1e-6)
  assert saturating_sigmoid(jnp.array(0.0)) == pytest.approx(0.5)


def test_eval_is_binary_threshold_at_zero():
  logits = jax.random.normal(jax.random.key(0), (16, 50)) * 3
  g = improved_semhash(logits, rng=None, train=False)
  np.testing.assert_array_equal(g, (np.asarray(logits) > 0).astype(np.float32))
  assert g.shape == logits.shape and g.dtype == logits.dtype


def test_binarize_rules():
  x = jnp.array([-1.0, -1e-4, -1e-5, 0.0, 1e-6, 1.0])
  np.testing.assert_array_equal(
      gates_lib.binarize(x, 'paper'), [0, 0, 0, 0, 1, 1]
  )
  # The official code: saturating_sigmoid(x) > 0.49999, x > about -3.3e-5.
  np.testing.assert_array_equal(
      gates_lib.binarize(x, 'official'), [0, 0, 1, 1, 1, 1]
  )
  np.testing.assert_array_equal(
      gates_lib.improved_semhash(x, rng=None, train=False, rule='official'),
      [0, 0, 1, 1, 1, 1],
  )
  # The straight-through gradient does not depend on the rule.
  grad = lambda rule: jax.grad(lambda v: gates_lib.hard_gate(v, rule).sum())(x)
  np.testing.assert_allclose(grad('official'), grad('paper'))
  with pytest.raises(ValueError, match='rule'):
    gates_lib.binarize(x, 'median')


def test_train_mixes_per_sample_not_per_gate():
  logits = jax.random.normal(jax.random.key(1), (400, 64)) * 2
  g = np.asarray(
      improved_semhash(logits, rng=jax.random.key(2), train=True, noise_std=0.0)
  )
  beta = (np.asarray(logits) > 0).astype(np.float32)
  alpha = np.asarray(saturating_sigmoid(logits))
  row_is_beta = np.all(g == beta, axis=1)
  row_is_alpha = np.all(np.isclose(g, alpha), axis=1)
  # Every sample uses one of the two for all its gates.
  assert np.all(row_is_beta | row_is_alpha)
  frac_beta = row_is_beta.mean()
  assert 0.4 < frac_beta < 0.6, frac_beta


def test_mix_prob_extremes_and_noise():
  logits = jnp.zeros((256, 32))
  key = jax.random.key(3)
  g1 = np.asarray(improved_semhash(logits, rng=key, train=True, mix_prob=1.0))
  assert set(np.unique(g1)) <= {0.0, 1.0}
  # With N(0,1) noise on zero logits about half the gates are on.
  assert 0.45 < g1.mean() < 0.55
  g0 = np.asarray(improved_semhash(logits, rng=key, train=True, mix_prob=0.0))
  assert np.all((g0 >= 0) & (g0 <= 1))
  assert len(np.unique(g0)) > 100  # continuous
  with pytest.raises(ValueError):
    improved_semhash(logits, rng=None, train=True)


def test_hard_gate_backward_is_saturating_sigmoid_gradient():
  x = jnp.linspace(-4, 4, 101)
  g = jax.grad(lambda v: jnp.sum(gates_lib.hard_gate(v) * jnp.arange(101.0)))(x)
  np.testing.assert_allclose(
      g, _sat_grad(np.asarray(x)) * np.arange(101.0), rtol=1e-5, atol=1e-7
  )
  # The saturated tails pass no gradient.
  assert g[0] == 0 and g[-1] == 0


@pytest.mark.parametrize('mix_prob', [0.0, 1.0])
def test_semhash_gradient_equals_alpha_gradient(mix_prob):
  logits = jax.random.normal(jax.random.key(4), (8, 20))
  w = jax.random.normal(jax.random.key(5), (8, 20))
  key = jax.random.key(6)
  grad = jax.grad(
      lambda l: jnp.sum(
          w * improved_semhash(l, rng=key, train=True, mix_prob=mix_prob)
      )
  )(logits)
  # Reconstruct the noisy logits the function drew.
  noise_key, _ = jax.random.split(key)
  noisy = logits + jax.random.normal(noise_key, logits.shape)
  np.testing.assert_allclose(
      grad, np.asarray(w) * _sat_grad(np.asarray(noisy)), rtol=1e-5, atol=1e-7
  )


def test_spec_flatten_unflatten_roundtrip():
  spec = GateSpec((('a', 3), ('b', 5), ('c', 2)))
  assert spec.total == 10 and spec.names == ('a', 'b', 'c')
  assert spec.offsets() == {'a': (0, 3), 'b': (3, 8), 'c': (8, 10)}
  flat = jnp.arange(40.0).reshape(4, 10)
  tree = spec.unflatten(flat)
  assert {k: v.shape for k, v in tree.items()} == {
      'a': (4, 3),
      'b': (4, 5),
      'c': (4, 2),
  }
  np.testing.assert_array_equal(tree['b'], flat[:, 3:8])
  np.testing.assert_array_equal(spec.flatten(tree), flat)
  with pytest.raises(AssertionError):
    GateSpec((('a', 3), ('a', 2)))


def test_gate_statistics_on_known_matrix():
  spec = GateSpec((('s1', 3), ('s2', 2)))
  # 4 samples x 5 gates: gate0 always on, gate1 always off, gate2 on twice,
  # gate3 on once, gate4 always on.
  g = np.array(
      [[1, 0, 1, 0, 1], [1, 0, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1]],
      np.float32,
  )
  tree = spec.unflatten(jnp.asarray(g))
  counts = np.asarray(gates_lib.gate_on_counts(tree, spec))
  np.testing.assert_array_equal(counts, [4, 0, 2, 1, 4])
  kinds = gates_lib.gate_type_counts(counts, 4, spec)
  assert kinds['s1'] == {'always_on': 1, 'always_off': 1, 'input_dependent': 1}
  assert kinds['s2'] == {'always_on': 1, 'always_off': 0, 'input_dependent': 1}
  assert kinds['total'] == {
      'always_on': 2,
      'always_off': 1,
      'input_dependent': 2,
  }
  # A mask drops padded samples: with the last two masked, gate2 is always on.
  masked = np.asarray(
      gates_lib.gate_on_counts(tree, spec, jnp.array([1.0, 1.0, 0.0, 0.0]))
  )
  np.testing.assert_array_equal(masked, [2, 0, 2, 1, 2])
  assert float(gates_lib.gate_l1(tree, spec)) == pytest.approx(g.mean())
  assert float(gates_lib.gate_l1({}, GateSpec())) == 0.0


def test_drop_gates_rates():
  spec = GateSpec((('a', 100), ('b', 300)))
  ones = spec.ones(50)
  key = jax.random.key(7)
  same = gates_lib.drop_gates(ones, spec, 0.0, key)
  assert float(spec.flatten(same).min()) == 1.0
  none = gates_lib.drop_gates(ones, spec, 1.0, key)
  assert float(spec.flatten(none).max()) == 0.0
  some = spec.flatten(gates_lib.drop_gates(ones, spec, 0.2, key))
  assert 0.17 < 1.0 - float(some.mean()) < 0.23
  # Survivors keep their value: no inverted-dropout rescaling.
  assert set(np.unique(np.asarray(some))) == {0.0, 1.0}
