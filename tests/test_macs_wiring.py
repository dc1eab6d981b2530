"""The gate wiring of DenseNet-BC, Shake-Shake and Inception-v4 for MAC
accounting (`backbone.gate_wiring()`, read by `gaternet_jax.macs`).

For each family, at a small width: open gates cost exactly the dense count,
closed gates less, one closed site saves what its conv shapes say, and a
brute-force count from a real forward and backward pass agrees channel by
channel with the declared wiring. The brute force records every conv's (and
fc's) input and, through a zero probe added to its output, the gradient of
the logits reaching that output: an input channel is removed when it is
identically zero, an output channel when no gradient reaches it.

The brute-force variables are all positive (kernels, BN scales, images;
BN means and offsets 0), so every pre-activation is strictly positive and
no ReLU zeroes a channel by chance: a zero input channel or a dead output
channel can only come from a closed gate, at any grid size.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax import macs
from gaternet_jax.models.densenet import densenet_bc
from gaternet_jax.models.gaternet import Gater, GaterNet
from gaternet_jax.models.inception_v4 import inception_v4
from gaternet_jax.models.resnet_cifar import cifar_resnet
from gaternet_jax.models.shakeshake import shake_shake

NUM_CLASSES = 5

# name -> (backbone factory, image side). DenseNet: three layers per block
# (two gated), k = 4. Shake-Shake: one block per stage, widths 4/8/16.
# Inception-v4: width 1/16 on its smallest input, 75x75.
FAMILIES = {
    'densenet': (
        lambda: densenet_bc(depth=22, growth_rate=4, num_classes=NUM_CLASSES),
        16,
    ),
    'shakeshake': (
        lambda: shake_shake(depth=8, width=4, num_classes=NUM_CLASSES),
        16,
    ),
    'inception': (
        lambda: inception_v4(num_classes=NUM_CLASSES, width=1 / 16),
        75,
    ),
}

# Inception-v4's reductions pass the previous site's gated channels through
# a max pool as their concatenation's last part: (site, previous site).
PASS_THROUGH = (
    ('Mixed_5a', 'Mixed_4a'),
    ('Mixed_6a', 'Mixed_5e'),
    ('Mixed_7a', 'Mixed_6h'),
)


def _gated(backbone) -> GaterNet:
  """The backbone with a tiny ResNet-8 gater, as `create_model` builds it."""
  features = cifar_resnet(depth=8, widths=(4, 8, 16), num_classes=None)
  gater = Gater(
      features=features,
      num_gates=backbone.gate_spec().total,
      bottleneck=8,
      batchnorm=True,
  )
  return GaterNet(backbone=backbone, gater=gater)


@pytest.fixture(scope='module')
def counters():
  """name -> (backbone, image side, MacCounter of the gated model)."""
  out = {}
  for name, (make, side) in FAMILIES.items():
    backbone = make()
    out[name] = (backbone, side, macs.count(_gated(backbone), (side, side, 3)))
  return out


def _layers(counter):
  """Backbone path (without 'backbone') -> its `macs.Layer`."""
  return {l.path[1:]: l for l in counter.layers if not l.overhead}


def _closed_site(spec, site, batch=2):
  """Open gates, except every gate of `site` in sample 1."""
  return {
      k: v.at[1].set(0.0) if k == site else v
      for k, v in spec.ones(batch).items()
  }


def _random_gates(spec, batch, seed):
  """Binary gates, each sample with its own probability of being open."""
  rng = np.random.default_rng(seed)
  p = np.linspace(0.25, 0.75, batch)[:, None]
  return {
      k: jnp.asarray(rng.uniform(size=(batch, n)) < p, jnp.float32)
      for k, n in spec.sites
  }


def _effective(gates):
  """Inception-v4 gates with each reduction's pass-through part also closed
  where the previous site closed it (the network computes the same)."""
  g = dict(gates)
  for site, prev in PASS_THROUGH:
    n = g[prev].shape[-1]
    g[site] = g[site].at[:, -n:].multiply(g[prev])
  return g


# --- counts from the wiring alone -------------------------------------------


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_every_site_is_wired_and_open_gates_cost_the_dense_count(
    counters, name
):
  backbone, _, counter = counters[name]
  spec = counter.spec
  assert set(backbone.gate_wiring()) == set(spec.names)
  # Every gate switches off some conv's output or some reader's input.
  for site, n in spec.sites:
    covered = np.zeros(n, bool)
    for l in counter.layers:
      for s in l.gated_in + l.gated_out:
        if s.site == site:
          covered[s.start : s.stop] = True
    assert covered.all(), site
  # Exact in float32: the small models cost less than 2**24 MACs.
  assert counter.dense_total < 2**24
  per = np.asarray(counter.per_sample(spec.ones(3)))
  np.testing.assert_array_equal(per, float(counter.dense_total))
  closed = np.asarray(
      counter.per_sample(
          {k: jnp.zeros_like(v) for k, v in spec.ones(2).items()}
      )
  )
  assert (closed < counter.dense_total).all()
  assert (closed > counter.dense_gater).all()


def test_densenet_closed_site_saves_the_analytic_amount(counters):
  # 16x16 inputs, k = 4, bottleneck 16; block 1 starts at 2k = 8 channels.
  # block1_layer02's 4 maps: its 3x3 conv2 (16 -> 4), then as inputs of
  # layer03's 1x1 conv1 (-> 16) and of transition1's 1x1 conv (8 + 3 * 4
  # = 20 -> 10).
  _, _, counter = counters['densenet']
  hw = 16 * 16
  saved = hw * 9 * 16 * 4 + hw * 4 * 16 + hw * 4 * 10
  per = np.asarray(
      counter.per_sample(_closed_site(counter.spec, 'block1_layer02'))
  )
  assert per[0] == counter.dense_total and per[0] - per[1] == saved
  # In the last block the reader after the block is the fc (1 MAC a pair).
  # Block 3 at 4x4: input int(0.5 * (10 + 12)) = 11, layer03 reads 4 more.
  saved = 16 * 9 * 16 * 4 + 16 * 4 * 16 + 4 * NUM_CLASSES
  per = np.asarray(
      counter.per_sample(_closed_site(counter.spec, 'block3_layer02'))
  )
  assert per[0] - per[1] == saved


def test_shakeshake_closed_site_saves_the_analytic_amount(counters):
  # Stage 2 (8 channels) at 8x8: the branch's 3x3 conv2, 8 -> 8.
  _, _, counter = counters['shakeshake']
  per = np.asarray(
      counter.per_sample(_closed_site(counter.spec, 'stage2_block1_branch2'))
  )
  assert per[0] - per[1] == 8 * 8 * 9 * 8 * 8


def test_inception_closed_site_saves_the_analytic_amount(counters):
  _, _, counter = counters['inception']
  # Width 1/16: ch(96) = 6, ch(64) = 4; Inception-A blocks run at 7x7 on 75x75
  # inputs with 4 * 6 = 24 channels. Mixed_5c's producers: 1x1 24 -> 6,
  # 3x3 4 -> 6, 3x3 6 -> 6, 1x1 (after the average pool) 24 -> 6; its
  # readers, Mixed_5d's first convs: 1x1 24 -> 6, 4, 4 and 6.
  hw = 7 * 7
  producers = hw * (24 * 6 + 9 * 4 * 6 + 9 * 6 * 6 + 24 * 6)
  readers = hw * 24 * (6 + 4 + 4 + 6)
  per = np.asarray(counter.per_sample(_closed_site(counter.spec, 'Mixed_5c')))
  assert per[0] - per[1] == producers + readers
  # Mixed_6a (3x3 grid): 3x3/2 24 -> 24 and 3x3/2 14 -> 16 produce its first
  # 40 channels; its max pool passes Mixed_5e's 24 and produces nothing.
  # Mixed_6b's first convs read all 64: 1x1 -> 24, 12, 12 and 8.
  hw = 3 * 3
  saved = hw * (9 * 24 * 24 + 9 * 14 * 16) + hw * 64 * (24 + 12 + 12 + 8)
  per = np.asarray(counter.per_sample(_closed_site(counter.spec, 'Mixed_6a')))
  assert per[0] - per[1] == saved


# --- brute force ------------------------------------------------------------


def _positive_variables(backbone, side, seed=0):
  """Backbone variables with every kernel, scale and variance positive and
  every BN mean and offset zero (see the module docstring)."""
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, None), x
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.uniform(0.5, 1.5, shape) / np.prod(shape[:-1])
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN means and offsets, dense biases.
      value = np.zeros(shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _is_layer(context):
  return context.method_name == '__call__' and isinstance(
      context.module, (nn.Conv, nn.Dense)
  )


def _brute_force_fn(backbone, variables, side, batch):
  """Jitted `(x, gates) -> ({path: (input dead, output dead)}, logits)`,
  each dead mask `(batch, channels)` bool: an input channel identically
  zero, an output channel that no gradient of the logits reaches."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_layer(context):
      shapes[tuple(context.module.path)] = out.shape
    return out

  x0 = jnp.zeros((batch, side, side, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda x, g: backbone.apply(variables, x, g),
        x0,
        backbone.gate_spec().ones(batch),
    )
  r = jax.random.normal(jax.random.key(1), (batch, NUM_CLASSES))

  def loss(probes, x, gates):
    inputs = {}

    def probe(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if _is_layer(context):
        path = tuple(context.module.path)
        inputs[path] = args[0]
        out = out + probes[path]
      return out

    with nn.intercept_methods(probe):
      logits, _ = backbone.apply(variables, x, gates)
    return jnp.sum(logits * r), (inputs, logits)

  @jax.jit
  def run(x, gates):
    probes = {p: jnp.zeros(s) for p, s in shapes.items()}
    grads, (inputs, logits) = jax.grad(loss, has_aux=True)(probes, x, gates)

    def dead(a):
      return jnp.all(a == 0, axis=tuple(range(1, a.ndim - 1)))

    return {p: (dead(inputs[p]), dead(grads[p])) for p in shapes}, logits

  return run


def _declared(layer, gates, batch):
  """What the wiring says `layer` loses: (inputs, outputs) removed, each
  `(batch, channels)` bool."""
  out = []
  for slices, n in ((layer.gated_in, layer.cin), (layer.gated_out, layer.cout)):
    removed = np.zeros((batch, n), bool)
    for s in slices:
      closed = np.asarray(gates[s.site])[:, s.start : s.stop] < 0.5
      removed[:, s.offset : s.offset + s.stop - s.start] |= closed
    out.append(removed)
  return out


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_wiring_matches_a_brute_force_count(counters, name):
  backbone, side, counter = counters[name]
  spec, batch = counter.spec, 4
  variables = _positive_variables(backbone, side)
  run = _brute_force_fn(backbone, variables, side, batch)
  x = jnp.asarray(
      np.random.default_rng(2).uniform(0.5, 1.5, (batch, side, side, 3)),
      jnp.float32,
  )
  # With open gates nothing is dead: no ReLU zeroes a channel by chance.
  for path, (din, dout) in run(x, spec.ones(batch))[0].items():
    assert not np.asarray(din).any() and not np.asarray(dout).any(), path
  gates = _random_gates(spec, batch, seed=3)
  found, logits = jax.device_get(run(x, gates))
  if name == 'inception':
    # What the network computes is the same; the wiring, giving each
    # channel one site, cannot see a pass-through closed upstream.
    eff = _effective(gates)
    np.testing.assert_array_equal(logits, run(x, eff)[1])
    over = np.asarray(counter.per_sample(gates)) - np.asarray(
        counter.per_sample(eff)
    )
    assert (over >= 0).all() and (over > 0).any()
    gates = eff
  layers = _layers(counter)
  assert set(found) == set(layers)
  total = np.full(batch, counter.dense_gater, np.int64)
  dead_branches = 0
  for path, (din, dout) in found.items():
    layer = layers[path]
    want_in, want_out = _declared(layer, gates, batch)
    np.testing.assert_array_equal(din, want_in, err_msg=str(path))
    # A conv whose whole output is dead though its own gates (if any) are
    # not all closed: a branch behind closed gates (a 1x1 reduce before a
    # closed producer), which the count leaves as the wiring says.
    branch = dout.all(-1) & ~want_out.all(-1)
    dead_branches += int(branch.sum())
    np.testing.assert_array_equal(
        dout[~branch], want_out[~branch], err_msg=str(path)
    )
    dout = np.where(branch[:, None], want_out, dout)
    total += (
        layer.coef * (layer.cin - din.sum(-1)) * (layer.cout - dout.sum(-1))
    )
  np.testing.assert_array_equal(np.asarray(counter.per_sample(gates)), total)
  assert (total < counter.dense_total).all()
  assert dead_branches < len(found)


def test_densenet_closed_inputs_are_image_independent_constants(counters):
  """With BN statistics and offsets that are not zero, a closed map reaches
  its readers through BN-ReLU as relu(BN(0)): not zero, but the same at
  every position and for every image. Each reader is a 1x1 conv or the fc,
  so that slice's work folds into a bias, which is why the wiring declares
  those readers' inputs removed."""
  backbone, side, counter = counters['densenet']
  spec = counter.spec
  shapes = jax.eval_shape(
      lambda x: backbone.init(jax.random.key(0), x, None),
      jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
  )
  rng = np.random.default_rng(4)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, l: jnp.asarray(
          rng.uniform(0.5, 1.5, l.shape)
          if p[-1].key in ('scale', 'var')
          else rng.normal(size=l.shape)
          * (
              np.sqrt(2.0 / np.prod(l.shape[:-1]))
              if p[-1].key == 'kernel'
              else 0.5
          ),
          l.dtype,
      ),
      shapes,
  )
  # Two images with the same gates: samples 0 and 1.
  g = _random_gates(spec, 1, seed=5)
  gates = {k: jnp.concatenate([v, v]) for k, v in g.items()}
  x = jax.random.normal(jax.random.key(6), (2, side, side, 3))
  modules = {}

  @jax.jit
  def run(x, gates):
    inputs = {}

    def record(next_fun, args, kwargs, context):
      if _is_layer(context):
        path = tuple(context.module.path)
        inputs[path], modules[path] = args[0], context.module
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      backbone.apply(variables, x, gates)
    return inputs

  inputs = run(x, gates)
  nonzero = checked = 0
  for path, layer in _layers(counter).items():
    if not layer.gated_in:
      continue
    m = modules[path]
    assert isinstance(m, nn.Dense) or tuple(m.kernel_size) == (1, 1), path
    removed, _ = _declared(layer, gates, 2)
    if not removed[0].any():
      continue
    checked += 1
    a = np.asarray(inputs[path])[..., removed[0]]
    a = a.reshape(2, -1, a.shape[-1])
    # The same value at every position of both images.
    np.testing.assert_array_equal(
        a, np.broadcast_to(a[:1, :1], a.shape), err_msg=str(path)
    )
    nonzero += int((a != 0).any())
  assert checked >= 6
  assert nonzero > 0  # BN(0) is not zero: the slice is folded, not zero.


def test_inception_auxiliary_head_costs_no_inference_macs():
  # Init builds the auxiliary head, evaluation never runs it: its layers
  # have parameters but no MACs in the count.
  model = _gated(inception_v4(num_classes=10, width=1 / 16, aux_logits=True))
  counter, variables = macs.count_with_variables(model, (299, 299, 3))
  assert 'AuxLogits' in variables['params']['backbone']
  assert counter.layers and not [
      l for l in counter.layers if 'AuxLogits' in l.path
  ]
