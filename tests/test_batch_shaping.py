"""Batch-shaping: the loss against SciPy, Gumbel-sigmoid gates, the global
batch under 8 devices, local gating in the models, and a run in which the
loss pulls the gates' marginals toward the Beta prior."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from gaternet_jax import gates as gates_lib
from gaternet_jax import losses
from gaternet_jax import train as train_lib
from gaternet_jax.errors import ConfigError
from gaternet_jax.models import create_model
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(values, a, b):
  """float64 loss and gradient, written independently of the JAX code."""
  v = np.asarray(values, np.float64)
  n, g = v.shape
  order = np.argsort(v, axis=0, kind='stable')
  s = np.take_along_axis(v, order, axis=0)
  ranks = np.arange(1, n + 1)[:, None] / (n + 1)
  cdf = stats.beta.cdf(s, a, b)
  loss = np.mean((cdf - ranks) ** 2)
  with np.errstate(divide='ignore'):
    pdf = np.clip(stats.beta.pdf(s, a, b), 1e-3, 100.0)
  pdf = np.where(np.isfinite(pdf), pdf, 100.0)
  grad_sorted = 2.0 * (cdf - ranks) * pdf / (n * g)
  grad = np.empty_like(v)
  np.put_along_axis(grad, order, grad_sorted, axis=0)
  return loss, grad


@pytest.mark.parametrize('a,b', [(0.6, 0.4), (2.0, 5.0), (1.0, 1.0)])
def test_batch_shaping_loss_matches_scipy(a, b):
  rng = np.random.default_rng(0)
  v = rng.uniform(size=(40, 7)).astype(np.float32)
  v[0, 0], v[1, 1], v[2, 1] = 0.0, 1.0, 1.0  # the pdf's poles
  v[3:9, 2] = 0.25  # ties
  v[:, 3] = 0.0  # a gate that is always off
  v[:, 4] = 1.0  # and one that is always on
  ref_loss, ref_grad = _reference(v, a, b)
  loss, grad = jax.value_and_grad(losses.batch_shaping_loss)(v, a, b)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_batch_shaping_loss_is_small_for_prior_samples():
  rng = np.random.default_rng(1)
  prior = rng.beta(0.6, 0.4, size=(512, 16)).astype(np.float32)
  off = np.full((512, 16), 0.1, np.float32)
  assert losses.batch_shaping_loss(prior) < 2e-3
  assert losses.batch_shaping_loss(off) > 0.1


def test_gumbel_sigmoid_gates():
  logits = jnp.array([[-3.0, -0.5, 0.0, 0.5, 3.0]] * 4000)
  g, soft = gates_lib.gumbel_sigmoid(logits, rng=jax.random.key(0), train=True)
  assert set(np.unique(np.asarray(g))) <= {0.0, 1.0}
  np.testing.assert_array_equal(g, (soft > 0.5).astype(np.float32))
  # P(gate on) = sigmoid(logit) for the binary concrete at any temperature.
  np.testing.assert_allclose(g.mean(0), jax.nn.sigmoid(logits[0]), atol=0.03)
  # Straight-through: the gate's gradient is the relaxed value's.
  w = jax.random.normal(jax.random.key(1), logits.shape)
  f_hard = lambda x: jnp.sum(
      w * gates_lib.gumbel_sigmoid(x, rng=jax.random.key(2), train=True)[0]
  )
  f_soft = lambda x: jnp.sum(
      w * gates_lib.gumbel_sigmoid(x, rng=jax.random.key(2), train=True)[1]
  )
  gh, gs = jax.grad(f_hard)(logits), jax.grad(f_soft)(logits)
  np.testing.assert_allclose(gh, gs, rtol=1e-6)
  assert float(jnp.abs(gh).sum()) > 0
  # Evaluation: deterministic 1(logit > 0).
  e, _ = gates_lib.gumbel_sigmoid(logits[:1], rng=None, train=False)
  np.testing.assert_array_equal(e[0], [0, 0, 0, 1, 1])
  with pytest.raises(ValueError):
    gates_lib.gumbel_sigmoid(logits, rng=None, train=True)


_SHARDED = """
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from gaternet_jax.losses import batch_shaping_loss
v = np.random.default_rng(0).uniform(size=(64, 12)).astype(np.float32)
mesh = Mesh(np.array(jax.devices()), ('data',))
x = jax.device_put(v, NamedSharding(mesh, P('data')))
loss, grad = jax.jit(jax.value_and_grad(batch_shaping_loss))(x)
np.savez(sys.argv[1], loss=np.asarray(loss), grad=np.asarray(grad),
         n=jax.device_count())
"""


def test_global_batch_sort_under_8_devices(tmp_path):
  out = tmp_path / 'bs.npz'
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  proc = subprocess.run(
      [sys.executable, '-c', _SHARDED, str(out)],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = np.load(out)
  assert int(r['n']) == 8
  v = np.random.default_rng(0).uniform(size=(64, 12)).astype(np.float32)
  loss, grad = jax.value_and_grad(losses.batch_shaping_loss)(v)
  np.testing.assert_allclose(r['loss'], loss, rtol=1e-6)
  np.testing.assert_allclose(r['grad'], grad, rtol=1e-5, atol=1e-9)
  # Per-device shards would give a different value: the sort is global.
  per_shard = np.mean([losses.batch_shaping_loss(s) for s in np.split(v, 8)])
  assert abs(per_shard - float(loss)) > 1e-3


def test_train_step_on_8_devices_matches_1_device(tmp_path):
  outs = []
  for n in (1, 8):
    out = tmp_path / f'local_{n}.npz'
    env = dict(
        os.environ,
        JAX_PLATFORMS='cpu',
        XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'tests', 'sharded_step.py'),
            str(out),
            'local',
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'devices={n}' in proc.stdout
    outs.append(dict(np.load(out)))
  one, eight = outs
  assert "metrics['batch_shaping']" in one and "metrics['l0']" in one
  assert 'eval_macs_mean' in one
  for k in one:
    np.testing.assert_allclose(
        one[k], eight[k], atol=1e-5, rtol=1e-5, err_msg=k
    )


@pytest.mark.parametrize(
    'backbone,position,sizes',
    [
        (
            dict(name='cifar_resnet', depth=8, widths=(4, 8, 16)),
            'conv1',
            (4, 8, 16),
        ),
        (
            dict(
                name='cifar_preact_resnet',
                depth=11,
                widths=((2, 8), (4, 16), (8, 32)),
            ),
            'conv2',
            (2, 4, 8),
        ),
        (
            dict(name='imagenet_resnet', depth=18, widths=(4, 8, 16, 32)),
            'conv1',
            (4, 4, 8, 8, 16, 16, 32, 32),
        ),
        (
            dict(name='imagenet_resnet', depth=50, widths=(2, 4, 8, 16)),
            'conv2',
            (2,) * 3 + (4,) * 4 + (8,) * 6 + (16,) * 3,
        ),
    ],
)
def test_local_gating_models(backbone, position, sizes):
  c = helpers.tiny_local_config()
  c.model.backbone = ml_collections.ConfigDict(dict(backbone))
  c.model.local_gating = ml_collections.ConfigDict(
      dict(position=position, hidden=4)
  )
  model = create_model(c.model, 5)
  spec = model.gate_spec()
  assert spec.sizes == sizes
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  variables = model.init(
      {'params': jax.random.key(1), 'gates': jax.random.key(2)}, x, train=False
  )
  (logits, out), state = model.apply(
      variables,
      x,
      train=True,
      rngs={'gates': jax.random.key(3)},
      mutable=['batch_stats'],
  )
  g = out['gates']
  assert logits.shape == (3, 5)
  assert set(g) == set(spec.names)
  for name, n in spec:
    assert g[name].shape == (3, n)
    assert set(np.unique(np.asarray(g[name]))) <= {0.0, 1.0}
  values, probs = out['gate_values'], out['gate_probs']
  assert set(values) == set(probs) == set(spec.names)

  # Opening and closing every gate (through the gate logits' bias) changes
  # the output: the gates are really applied.
  def with_gate_bias(value):
    def f(path, p):
      key = jax.tree_util.keystr(path)
      hit = "'gate'" in key and "'fc2'" in key and "'bias'" in key
      return jnp.full_like(p, value) if hit else p

    return dict(
        variables,
        params=jax.tree_util.tree_map_with_path(f, variables['params']),
    )

  logits_open, out_open = model.apply(with_gate_bias(1e4), x, train=False)
  logits_closed, out_closed = model.apply(with_gate_bias(-1e4), x, train=False)
  g_open, g_closed = out_open['gates'], out_closed['gates']
  assert np.all(np.asarray(spec.flatten(g_open)) == 1.0)
  assert np.all(np.asarray(spec.flatten(g_closed)) == 0.0)
  assert not np.allclose(logits_open, logits_closed)


def test_config_errors():
  # One field says the method: there is no way to ask for both, and a
  # config in the old terms gets a sentence that names the new ones.
  c = helpers.tiny_local_config()
  c.model.gating = 'both'
  with pytest.raises(ConfigError, match='model.gating must be one of'):
    create_model(c.model, 3)
  c = helpers.tiny_local_config()
  c.model.gated = True
  with pytest.raises(ConfigError, match='model.gating'):
    create_model(c.model, 3)
  c = helpers.tiny_config()
  c.model.backbone.local_gating = ml_collections.ConfigDict(dict(hidden=4))
  with pytest.raises(ConfigError, match="model.gating='local'"):
    create_model(c.model, 3)
  c = helpers.tiny_local_config()
  c.model.local_gating.position = 'conv9'
  with pytest.raises(ConfigError, match='position'):
    create_model(c.model, 3)
  c = helpers.tiny_config(gated=True)
  c.batch_shaping.weight = 0.5
  with pytest.raises(ConfigError, match='local_gating'):
    train_lib.train(
        c, '/nonexistent/never-created', dataset=helpers.synthetic_dataset()
    )


def test_loss_weight_schedules():
  c = helpers.tiny_local_config()
  c.batch_shaping.update(
      dict(weight=0.8, final_weight=0.0, decay_start_epoch=2, decay_end_epoch=4)
  )
  c.l0.update(dict(weight=0.3, start_epoch=4, ramp_epochs=2))
  w = lambda step: {
      k: float(v)
      for k, v in losses.gate_loss_weights(c, step, steps_per_epoch=10).items()
  }
  assert w(0) == {'batch_shaping': pytest.approx(0.8), 'l0': 0.0}
  assert w(30)['batch_shaping'] == pytest.approx(0.4)
  assert w(40) == {'batch_shaping': 0.0, 'l0': 0.0}
  assert w(50)['l0'] == pytest.approx(0.15)
  assert w(1000) == {'batch_shaping': 0.0, 'l0': pytest.approx(0.3)}


def _ks_to_prior(values, a=0.6, b=0.4):
  """Mean over gates of the Kolmogorov-Smirnov distance to Beta(a, b)."""
  v = np.asarray(values, np.float64)
  return float(
      np.mean(
          [
              stats.kstest(v[:, j], 'beta', args=(a, b)).statistic
              for j in range(v.shape[1])
          ]
      )
  )


def _shaping_run(weight: float, steps: int = 60):
  """Trains the tiny self-gated net on batch-shaping (+ CE) and returns the
  KS distance of its relaxed gates to the prior before and after."""
  c = helpers.tiny_local_config(l0=False)
  ds = helpers.synthetic_dataset(n_train=128, size=16)
  model = create_model(c.model, ds.num_classes)
  spec = model.gate_spec()
  x = (ds.train_images.astype(np.float32) / 255.0 - 0.5) / 0.3
  y = ds.train_labels
  variables = model.init(
      {'params': jax.random.key(0), 'gates': jax.random.key(1)},
      x[:2],
      train=False,
  )
  tx = optax.adam(0.01)
  params, bstats = variables['params'], variables['batch_stats']
  opt = tx.init(params)

  def loss_fn(params, bstats, rng):
    (logits, out), st = model.apply(
        {'params': params, 'batch_stats': bstats},
        x,
        train=True,
        rngs={'gates': rng},
        mutable=['batch_stats'],
    )
    values = spec.flatten(out['gate_values'])
    bs = losses.batch_shaping_loss(values)
    loss = losses.cross_entropy(logits, y) + weight * bs
    return loss, (values, st['batch_stats'])

  @jax.jit
  def step(params, bstats, opt, rng):
    (_, (values, bstats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, bstats, rng
    )
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), bstats, opt, values

  ks = []
  for i in range(steps):
    params, bstats, opt, values = step(
        params, bstats, opt, jax.random.key(100 + i)
    )
    if i in (0, steps - 1):
      ks.append(_ks_to_prior(values))
  return ks


def test_batch_shaping_pulls_gates_toward_the_prior():
  before, after = _shaping_run(weight=5.0)
  _, control = _shaping_run(weight=0.0)
  # Measured: KS 0.159 -> 0.092 with the loss; 0.196 without it.
  assert after < 0.7 * before, (before, after)
  assert after < 0.7 * control, (after, control)


def test_summary_of_a_batch_shaping_config():
  from configs import cifar10_r20_bas  # pylint: disable=g-import-not-at-top
  from gaternet_jax import summary  # pylint: disable=g-import-not-at-top

  s = summary.model_summary(cifar10_r20_bas.get_config())
  assert s['gating'] == 'local' and s['gated_filters'] == 336
  assert s['params_gater'] == 0 and s['macs_backbone'] == 40813184
  # Gating module of a unit reading c_in channels and gating c: FC c_in->16,
  # BN(16), FC 16->c. Stage widths 16, 32, 64; each first unit reads the
  # previous width.
  unit = lambda cin, c: cin * 16 + 16 + 2 * 16 + 16 * c + c
  expected = (
      3 * unit(16, 16)
      + unit(16, 32)
      + 2 * unit(32, 32)
      + unit(32, 64)
      + 2 * unit(64, 64)
  )
  assert s['params_gating_modules'] == expected == 10752
  # Their MACs: the two FCs per unit (pooling is not counted).
  assert s['macs_gater'] == expected - 9 * (16 + 2 * 16) - (
      3 * 16 + 3 * 32 + 3 * 64
  )
