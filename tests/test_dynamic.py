"""Dynamic execution and compaction give the masked model's outputs.

Every supported family (CIFAR basic and pre-activation bottleneck ResNets,
ImageNet bottleneck ResNets), with a gater's gates and with local gates at
each position, on random gate patterns that include a site with every gate
off and one with every gate on.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from gaternet_jax import compact
from gaternet_jax import dynamic
from gaternet_jax import macs
from gaternet_jax.errors import ConfigError, UserError
from gaternet_jax.models import create_model
from gaternet_jax.models.compaction import Compaction

# (name, backbone fields, gating, local position, image size)
CASES = {
    'cifar-basic-gater': (
        dict(name='cifar_resnet', depth=8, widths=(4, 8, 8)),
        'gater',
        None,
        8,
    ),
    'cifar-basic-local': (
        dict(name='cifar_resnet', depth=8, widths=(4, 8, 8)),
        'local',
        'conv1',
        8,
    ),
    'cifar-preact-gater': (
        dict(
            name='cifar_preact_resnet',
            depth=11,
            widths=((2, 8), (4, 8), (4, 16)),
            stem_width=8,
        ),
        'gater',
        None,
        8,
    ),
    'cifar-preact-local-conv2': (
        dict(
            name='cifar_preact_resnet',
            depth=11,
            widths=((2, 8), (4, 8), (4, 16)),
            stem_width=8,
        ),
        'local',
        'conv2',
        8,
    ),
    'imagenet-bottleneck-gater': (
        dict(name='imagenet_resnet', depth=50, widths=(2, 2, 4, 4)),
        'gater',
        None,
        32,
    ),
    'imagenet-bottleneck-local-conv1': (
        dict(name='imagenet_resnet', depth=50, widths=(2, 2, 4, 4)),
        'local',
        'conv1',
        32,
    ),
}


def _config(backbone, gating, position):
  c = base.base_config()
  c.model.backbone = ml_collections.ConfigDict(dict(backbone, se_reduction=0))
  c.model.gater = ml_collections.ConfigDict(
      dict(
          name='cifar_resnet',
          depth=8,
          widths=(4, 4, 4),
          bottleneck=4,
          batchnorm=True,
      )
  )
  c.model.gating = gating
  if position:
    c.model.local_gating.position = position
    c.model.local_gating.hidden = 4
  return c


def _randomise_stats(variables, seed):
  """BN statistics away from init (so BN entries must be gathered right)."""
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    if 'var' in name:
      return x * rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if 'mean' in name or 'bias' in name or 'scale' in name:
      return x + rng.normal(0, 0.3, x.shape).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(perturb, variables)


@functools.lru_cache(maxsize=None)
def _built(case):
  backbone, gating, position, size = CASES[case]
  config = _config(backbone, gating, position)
  model = create_model(config.model, 5)
  x = jnp.asarray(
      np.random.default_rng(0).normal(size=(3, size, size, 3)), jnp.float32
  )
  variables = model.init(
      {'params': jax.random.key(0), 'gates': jax.random.key(1)}, x, train=False
  )
  variables = jax.device_get(_randomise_stats(variables, 1))
  return config, model, variables, x


def _pattern_gates(spec, batch, seed):
  """Random per-image gates; the first site all off, the second all on."""
  rng = np.random.default_rng(seed)
  gates = {}
  for i, (name, n) in enumerate(spec.sites):
    g = rng.random((batch, n)) < 0.5
    if i == 0:
      g[:] = False
    elif i == 1:
      g[:] = True
    gates[name] = jnp.asarray(g, jnp.float32)
  return gates


def _relative(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('case', sorted(CASES))
def test_dynamic_execution_equals_the_masked_model(case):
  _, model, variables, x = _built(case)
  spec = model.gate_spec()
  masked = jax.jit(lambda v, x, g: dynamic.masked_backbone(model, v, x, g))
  # A batch gathering each input's filters, and one running the union of
  # its inputs' open channels.
  for per_input, seed in ((8, 3), (2, 4)):
    gates = _pattern_gates(spec, 3, seed)
    want = masked(variables, x, gates)
    got = _dynamic(model, per_input)(variables, x, gates)
    assert _relative(got, want) < 1e-4, per_input


def _dynamic(model, per_input=8):
  return jax.jit(
      lambda v, x, g: dynamic.backbone_apply(
          model, v, x, g, num_buckets=2, per_input_batch=per_input
      )[0]
  )


def test_dynamic_execution_with_every_gate_on_or_off():
  """The largest and the smallest (empty) bucket at every site."""
  _, model, variables, x = _built('cifar-basic-local')
  run = _dynamic(model)
  for value in (0.0, 1.0):
    gates = {n: jnp.full((3, k), value) for n, k in model.gate_spec().sites}
    want = dynamic.masked_backbone(model, variables, x, gates)
    assert _relative(run(variables, x, gates), want) < 1e-4, value


@pytest.mark.parametrize('case', ['cifar-basic-gater', 'cifar-basic-local'])
def test_dynamic_apply_at_batch_1_uses_the_models_own_gates(case):
  _, model, variables, x = _built(case)
  for i in range(2):
    image = x[i : i + 1]
    logits, out = model.apply(variables, image, train=False)
    got, gates = jax.jit(lambda v, x: dynamic.apply(model, v, x))(
        variables, image
    )
    assert _relative(got, logits) < 1e-4
    for name in model.gate_spec().names:
      np.testing.assert_array_equal(gates[name], out['gates'][name])


def test_buckets():
  assert dynamic.buckets(16, 4) == (0, 4, 8, 12, 16)
  assert dynamic.buckets(3, 8) == (0, 1, 2, 3)
  assert dynamic.buckets(10, 3) == (0, 4, 7, 10)


def _random_compaction(spec, seed, chars='10*', whole_sites=True):
  rng = np.random.default_rng(seed)
  patterns = []
  for i, (name, n) in enumerate(spec.sites):
    pattern = ''.join(rng.choice(list(chars), n))
    if whole_sites and i == 0:
      pattern = '0' * n  # Every filter removed.
    elif whole_sites and i == 1:
      pattern = '1' * n  # Every gate folded.
    elif not whole_sites:
      pattern = '1' + pattern[1:]  # No site loses every filter.
    patterns.append((name, pattern))
  return Compaction(tuple(patterns))


@pytest.mark.parametrize('case', sorted(CASES))
def test_compacted_model_equals_the_masked_model(case):
  config, model, variables, x = _built(case)
  spec = model.gate_spec()
  compaction = _random_compaction(spec, 5)
  small_config = compact.compacted_config(config, compaction)
  small = create_model(small_config.model, 5)
  small_vars = compact.compact_variables(model, variables, compaction)
  # The gathered variables are exactly what the compacted model holds.
  shapes = jax.eval_shape(
      lambda: small.init(
          {'params': jax.random.key(0), 'gates': jax.random.key(1)},
          x,
          train=False,
      )
  )
  assert jax.tree_util.tree_map(np.shape, small_vars) == (
      jax.tree_util.tree_map(lambda a: a.shape, shapes)
  )
  small_spec = small.gate_spec()
  assert small_spec.total == compaction.summary()['input_dependent']
  dependent = _pattern_gates(small_spec, 3, 6)
  full = compaction.expand(dependent, 3)
  want = dynamic.masked_backbone(model, variables, x, full)
  got = dynamic.masked_backbone(small, small_vars, x, dependent)
  assert _relative(got, want) < 1e-5
  if case.startswith('imagenet'):
    return  # The MAC check below traces two more networks: CIFAR's suffice.
  # The compacted network is smaller by what the MAC count says the
  # constant gates save (a gater's unit with every gate off loses more: its
  # whole branch, which the count does not know is dead).
  constant = _random_compaction(spec, 7, chars='10', whole_sites=False)
  small = create_model(compact.compacted_config(config, constant).model, 5)
  counter = macs.count(model, x.shape[1:])
  small_counter = macs.count(small, x.shape[1:])
  saved = float(counter.saved_per_sample(constant.expand({}, 1))[0])
  assert small_counter.dense_backbone == counter.dense_backbone - saved
  assert small.gate_spec().total == 0


def test_compacted_gater_counts_gates_that_leave_their_pattern():
  config, model, variables, x = _built('cifar-basic-gater')
  _, out = model.apply(variables, x, train=False)
  flat = np.asarray(model.gate_spec().flatten(out['gates']))
  # A pattern that holds for the first two images only.
  first_two = flat[:2]
  on_counts = first_two.sum(axis=0).astype(np.int64)
  compaction = Compaction.from_on_counts(model.gate_spec(), on_counts, 2)
  small = create_model(compact.compacted_config(config, compaction).model, 5)
  small_vars = compact.compact_variables(model, variables, compaction)
  logits, small_out = small.apply(small_vars, x, train=False)
  unseen = np.asarray(small_out['unseen_gates'])
  assert list(unseen[:2]) == [0, 0]
  # Image 3's gates that differ from the constants of the first two.
  constant = np.asarray(
      [c != '*' for _, p in compaction.patterns for c in p], bool
  )
  value = np.asarray([c == '1' for _, p in compaction.patterns for c in p])
  assert unseen[2] == int(np.sum(((flat[2] > 0.5) != value) & constant))
  # Where no gate left its pattern, the logits are the trained model's.
  ref, _ = model.apply(variables, x, train=False)
  assert _relative(logits[:2], ref[:2]) < 1e-5


def test_unsupported_models_get_one_sentence():
  c = _config(CASES['cifar-basic-gater'][0], 'gater', None)
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='densenet_bc', depth=16, growth_rate=8)
  )
  model = create_model(c.model, 5)
  with pytest.raises(UserError, match='supports the ResNet backbones'):
    dynamic.check_supported(model, 'compaction')
  c = _config(CASES['cifar-basic-gater'][0], 'none', None)
  with pytest.raises(UserError, match="model.gating='none'"):
    dynamic.check_supported(create_model(c.model, 5), 'dynamic execution')
  c = _config(dict(CASES['cifar-basic-gater'][0]), 'gater', None)
  c.model.backbone.se_reduction = 4
  with pytest.raises(UserError, match='squeeze-and-excitation'):
    dynamic.check_supported(create_model(c.model, 5), 'compaction')


def test_bad_compaction_strings_get_one_sentence():
  c = _config(CASES['cifar-basic-gater'][0], 'gater', None)
  c.model.compaction = 'stage1_block1=1x0'
  with pytest.raises(ConfigError, match="'1' \\(always on\\)"):
    create_model(c.model, 5)
  c.model.compaction = 'stage1_block1=1010'
  with pytest.raises(ConfigError, match='does not fit the model'):
    create_model(c.model, 5)
  c.model.compaction = 'nonsense'
  with pytest.raises(ConfigError, match='site=pattern'):
    create_model(c.model, 5)
