"""Tests of gaternet_jax.convert against a PyTorch re-creation of GaterNet.

The reference networks below are written from the published description of
the official google-research/gaternet models (key names and forward pass),
with every weight AND every BatchNorm statistic randomised, so a wrong
transpose, a swapped scale/bias or mean/var, or a misplaced gate slice shows
up as a logit difference.
"""

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip('torch')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from torch import nn  # pylint: disable=g-import-not-at-top
import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

from gaternet_jax import convert  # pylint: disable=g-import-not-at-top
from gaternet_jax.errors import UserError  # pylint: disable=g-import-not-at-top
from gaternet_jax.models import create_model  # pylint: disable=g-import-not-at-top

WIDTHS = (16, 32, 64)
BATCH = 6


# ---------------------------------------------------------------------------
# Reference PyTorch models (NCHW), keyed like the official checkpoints.


class RefBlock(nn.Module):
  """conv-bn-relu-conv-bn, times the gate, plus the shortcut, relu."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Sequential()
    if cin != cout:
      self.shortcut.add_module(
          'conv', nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
      )
      self.shortcut.add_module('bn', nn.BatchNorm2d(cout))

  def forward(self, x, gate=None):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if gate is not None:  # (batch, cout), broadcast over space.
      y = y * gate[:, :, None, None]
    return F.relu(y + self.shortcut(x))


class RefResNet(nn.Module):
  """CIFAR ResNet of depth 6n+2 whose head is named `head`."""

  def __init__(self, depth, num_out, head):
    super().__init__()
    n = (depth - 2) // 6
    self.conv = nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False)
    self.bn = nn.BatchNorm2d(WIDTHS[0])
    cin = WIDTHS[0]
    for s, width in enumerate(WIDTHS):
      stage = nn.Sequential()
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        stage.add_module(f'block{b + 1}', RefBlock(cin, width, stride))
        cin = width
      setattr(self, f'stage{s + 1}', stage)
    self.head = head
    setattr(self, head, nn.Linear(WIDTHS[-1], num_out))

  def forward(self, x, gates=None):
    """gates: None or (batch, total), stage-major, one slice per block."""
    y = F.relu(self.bn(self.conv(x)))
    offset = 0
    for s in range(len(WIDTHS)):
      for block in getattr(self, f'stage{s + 1}'):
        width = block.bn2.num_features
        gate = None if gates is None else gates[:, offset : offset + width]
        offset += width
        y = block(y, gate)
    if gates is not None:
      assert offset == gates.shape[1], (offset, gates.shape)
    y = y.mean(dim=(2, 3))
    return getattr(self, self.head)(y)


class RefFNN(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.fc = nn.Sequential(nn.Linear(cin, cout))


class RefGater(nn.Module):
  """ResNet-20 -> newfc -> relu -> fnn.fc.0; returns (logits, gates)."""

  def __init__(self, num_gates, bottleneck=8):
    super().__init__()
    self.resnet = RefResNet(20, bottleneck, head='newfc')
    self.fnn = RefFNN(bottleneck, num_gates)

  def forward(self, x):
    logits = self.fnn.fc(F.relu(self.resnet(x)))
    # The official evaluation-time binarisation.
    soft = torch.clamp(1.2 * torch.sigmoid(logits) - 0.1, 0.0, 1.0)
    return logits, (soft > 0.49999).float()


def num_gates(depth):
  return sum(WIDTHS) * ((depth - 2) // 6)


def randomise_(module, generator):
  """Random weights and BN statistics far from PyTorch's defaults."""

  def normal(shape, std, mean=0.0):
    return mean + std * torch.randn(shape, generator=generator)

  def uniform(shape, lo, hi):
    return lo + (hi - lo) * torch.rand(shape, generator=generator)

  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(normal(m.weight.shape, (1.0 / fan_in) ** 0.5))
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(uniform(c, 0.5, 1.2))
        m.bias.copy_(normal(c, 0.2))
        m.running_mean.copy_(normal(c, 0.3))
        m.running_var.copy_(uniform(c, 0.3, 2.0))
        m.num_batches_tracked.fill_(1234)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(normal(m.weight.shape, m.in_features**-0.5))
        m.bias.copy_(normal(m.bias.shape, 0.3))


def make_reference(depth, seed=0):
  """Random backbone and gater in eval mode, gates a mix of 0s and 1s."""
  g = torch.Generator().manual_seed(seed)
  backbone = RefResNet(depth, 10, head='fc')
  gater = RefGater(num_gates(depth))
  randomise_(backbone, g)
  randomise_(gater, g)
  with torch.no_grad():
    # The gater's last layer decides how many gates are on: scale it up so
    # input-dependent features move logits across 0, and centre its bias on
    # the mean pre-activation so that roughly half the gates are on.
    images = torch.randn(64, 3, 32, 32, generator=g)
    h = F.relu(gater.resnet(images))
    fc = gater.fnn.fc[0]
    fc.weight.mul_(4.0)
    fc.bias.copy_(
        -(h.mean(0) @ fc.weight.T)
        + 0.5 * torch.randn(fc.bias.shape, generator=g)
    )
  return backbone.eval(), gater.eval()


def reference_forward(backbone, gater, images_nchw):
  with torch.no_grad():
    gate_logits, gates = gater(images_nchw)
    logits = backbone(images_nchw, gates)
  return logits.numpy(), gate_logits.numpy(), gates.numpy()


def save_checkpoint(path, backbone, gater, prefix_backbone=True):
  bsd = backbone.state_dict()
  if prefix_backbone:  # As saved from an nn.DataParallel wrapper.
    bsd = {f'module.{k}': v for k, v in bsd.items()}
  torch.save(
      {
          'backbone_state_dict': bsd,
          'gater_state_dict': gater.state_dict(),
          'epoch': 300,
      },
      path,
  )


def random_images(seed, batch=BATCH):
  """Normalised images: NCHW for torch, NHWC for jax."""
  g = torch.Generator().manual_seed(seed)
  nchw = torch.randn(batch, 3, 32, 32, generator=g)
  return nchw, jnp.asarray(nchw.permute(0, 2, 3, 1).numpy())


def numpy_state_dicts(backbone, gater):
  return (
      {k: v.numpy().copy() for k, v in backbone.state_dict().items()},
      {k: v.numpy().copy() for k, v in gater.state_dict().items()},
  )


@pytest.fixture(scope='module')
def ref20(tmp_path_factory):
  backbone, gater = make_reference(20, seed=0)
  path = tmp_path_factory.mktemp('ckpt') / 'gaternet20.pth'
  save_checkpoint(path, backbone, gater)
  return backbone, gater, path


@pytest.fixture(scope='module')
def ref56(tmp_path_factory):
  backbone, gater = make_reference(56, seed=1)
  path = tmp_path_factory.mktemp('ckpt') / 'gaternet56.pth'
  save_checkpoint(path, backbone, gater)
  return backbone, gater, path


def _logits_and_gates(model, v, x):
  logits, out = model.apply(v, x, train=False)
  return logits, out['gates']


# One compilation per (equal, hashable) model, shared by the tests.
apply_eval = jax.jit(_logits_and_gates, static_argnums=0)


# ---------------------------------------------------------------------------
# Equivalence.


@pytest.mark.parametrize('depth', [20, 56])
def test_matches_reference(depth, ref20, ref56):
  backbone, gater, path = {20: ref20, 56: ref56}[depth]
  model, variables = convert.load_official_checkpoint(
      path, backbone_depth=depth
  )
  nchw, nhwc = random_images(seed=depth)
  ref_logits, ref_gate_logits, ref_gates = reference_forward(
      backbone, gater, nchw
  )
  assert 0.2 < ref_gates.mean() < 0.8, ref_gates.mean()
  # Some gates are on for one image and off for another.
  assert np.any(ref_gates.min(0) != ref_gates.max(0))
  # Logits of a size where 1e-4 is a tight tolerance.
  assert 0.3 < np.abs(ref_logits).max() < 100.0, np.abs(ref_logits).max()

  logits, gates = apply_eval(model, variables, nhwc)
  spec = model.gate_spec()
  assert spec.total == num_gates(depth)
  flat = np.asarray(spec.flatten(gates))
  # The official binarisation, 1(sat_sigmoid(logit) > 0.49999): every
  # gate as the official code has it (gate logits near 0: the test below).
  decided = np.abs(ref_gate_logits) >= 1e-4
  np.testing.assert_array_equal(flat[decided], ref_gates[decided])
  np.testing.assert_array_equal(flat, ref_gates)
  diff = np.abs(np.asarray(logits) - ref_logits).max()
  print(f'depth {depth}: max |logit diff| = {diff:.3g}')
  assert diff < 1e-4, diff


def test_official_gates_come_out_exactly_at_the_threshold(ref20):
  """Logits in (-3.3e-5, 0] are on in the official model (sat_sigmoid >
  0.49999) and off under the paper's 1(logit > 0): an imported checkpoint
  binarises the official way and reproduces every gate."""
  import copy  # pylint: disable=g-import-not-at-top

  backbone, gater, _ = ref20
  gater = copy.deepcopy(gater)
  nchw, nhwc = random_images(seed=11)
  _, gate_logits, _ = reference_forward(backbone, gater, nchw)
  moved = np.arange(0, num_gates(20), 7)  # every 7th gate, on image 0
  with torch.no_grad():
    bias = gater.fnn.fc[0].bias
    bias[moved] -= torch.as_tensor(gate_logits[0, moved] + 1.5e-5)
  ref_logits, gate_logits, ref_gates = reference_forward(backbone, gater, nchw)
  assert np.all(
      (gate_logits[0, moved] > -3e-5) & (gate_logits[0, moved] <= 0)
  ), gate_logits[0, moved]
  assert np.all(ref_gates[0, moved] == 1.0)
  model, variables = convert.load_official_checkpoint(
      {
          'backbone_state_dict': backbone.state_dict(),
          'gater_state_dict': gater.state_dict(),
      }
  )
  assert model.binarize == 'official'
  logits, gates = apply_eval(model, variables, nhwc)
  flat = np.asarray(model.gate_spec().flatten(gates))
  np.testing.assert_array_equal(flat, ref_gates)
  assert np.abs(np.asarray(logits) - ref_logits).max() < 1e-4
  # The paper's rule closes those gates.
  _, paper_gates = apply_eval(model.clone(binarize='paper'), variables, nhwc)
  paper = np.asarray(model.gate_spec().flatten(paper_gates))
  assert np.all(paper[0, moved] == 0.0)


def test_gates_matter(ref20):
  backbone, gater, path = ref20
  model, variables = convert.load_official_checkpoint(path)
  nchw, nhwc = random_images(seed=7)
  logits, _ = apply_eval(model, variables, nhwc)
  # The backbone alone with every gate open, in both frameworks.
  spec = model.gate_spec()
  backbone_vars = {c: variables[c]['backbone'] for c in variables}
  dense, _ = model.backbone.apply(
      backbone_vars, nhwc, spec.ones(BATCH), train=False
  )
  with torch.no_grad():
    ref_dense = backbone(nchw, torch.ones(BATCH, spec.total)).numpy()
  assert np.abs(np.asarray(dense) - ref_dense).max() < 1e-4
  assert np.abs(np.asarray(logits) - np.asarray(dense)).max() > 0.1


def test_variables_have_init_structure(ref20):
  _, _, path = ref20
  model, variables = convert.load_official_checkpoint(path)
  expected = jax.eval_shape(
      lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
      jax.random.key(0),
  )
  assert jax.tree_util.tree_structure(
      variables
  ) == jax.tree_util.tree_structure(expected)
  shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables)
  assert shapes == jax.tree_util.tree_map(
      lambda a: (a.shape, a.dtype), expected
  )
  assert set(variables) == {'params', 'batch_stats'}
  assert 'bn' not in variables['params']['gater']
  assert all(
      isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(variables)
  )


@pytest.mark.parametrize(
    'corruption',
    [
        'swap_bn_mean_var',
        'swap_bn_scale_bias',
        'flip_conv_kernel',
        'shift_gate_slices',
        'gater_bn_mean',
    ],
)
def test_reference_detects_wrong_mappings(corruption, ref20):
  """The randomised reference is sensitive to each plausible mapping slip."""
  backbone, gater, _ = ref20
  bsd, gsd = numpy_state_dicts(backbone, gater)
  if corruption == 'swap_bn_mean_var':
    k = 'stage2.block2.bn1.'
    bsd[k + 'running_mean'], bsd[k + 'running_var'] = (
        bsd[k + 'running_var'],
        bsd[k + 'running_mean'],
    )
  elif corruption == 'swap_bn_scale_bias':
    k = 'stage3.block1.shortcut.bn.'
    bsd[k + 'weight'], bsd[k + 'bias'] = bsd[k + 'bias'], bsd[k + 'weight']
  elif corruption == 'flip_conv_kernel':  # e.g. a wrong spatial transpose.
    k = 'stage1.block1.conv1.weight'
    bsd[k] = bsd[k].transpose(0, 1, 3, 2).copy()
  elif corruption == 'shift_gate_slices':  # gates read from the wrong site.
    k = 'fnn.fc.0.'
    gsd[k + 'weight'] = np.roll(gsd[k + 'weight'], 16, axis=0)
    gsd[k + 'bias'] = np.roll(gsd[k + 'bias'], 16, axis=0)
  elif corruption == 'gater_bn_mean':
    gsd['resnet.stage3.block3.bn2.running_mean'] *= 0.0
  model = create_model(convert.official_model_config(20), 10)
  variables = convert.convert_state_dicts(bsd, gsd, 20)
  nchw, nhwc = random_images(seed=3)
  ref_logits, _, _ = reference_forward(backbone, gater, nchw)
  logits, _ = apply_eval(model, variables, nhwc)
  assert np.abs(np.asarray(logits) - ref_logits).max() > 1e-3


# ---------------------------------------------------------------------------
# Inputs and errors.


def test_state_dict_passed_directly(ref20):
  backbone, gater, path = ref20
  _, from_file = convert.load_official_checkpoint(path)
  # Tensors, with 'module.' on the gater this time.
  checkpoint = {
      'backbone_state_dict': backbone.state_dict(),
      'gater_state_dict': {
          f'module.{k}': v for k, v in gater.state_dict().items()
      },
  }
  model, from_dict = convert.load_official_checkpoint(checkpoint)
  assert model.gate_spec().total == 336
  # And numpy arrays through convert_state_dicts.
  from_numpy = convert.convert_state_dicts(
      *numpy_state_dicts(backbone, gater), 20
  )
  for other in (from_dict, from_numpy):
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_file, other)


def test_missing_file(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    convert.load_official_checkpoint(tmp_path / 'nope.pth')
  with pytest.raises(UserError, match='does not exist'):
    convert.load_official_checkpoint(str(tmp_path / 'nope.pth'))


def test_unreadable_files(tmp_path):
  garbage = tmp_path / 'garbage.pth'
  garbage.write_bytes(b'this is not a torch checkpoint')
  with pytest.raises(UserError, match='weights_only=True'):
    convert.load_official_checkpoint(garbage)
  # A pickle of objects weights_only refuses to build.
  unsafe = tmp_path / 'unsafe.pth'
  torch.save(
      {
          'backbone_state_dict': {},
          'gater_state_dict': {},
          'args': UnpicklableArgs(),
      },
      unsafe,
  )
  with pytest.raises(UserError, match='not a torch.save file of plain'):
    convert.load_official_checkpoint(unsafe)
  with pytest.raises(UserError, match='directory'):
    convert.load_official_checkpoint(tmp_path)


class UnpicklableArgs:
  """A custom class, as in checkpoints that pickle argparse results."""


def test_wrong_depth(ref20, ref56):
  _, _, path20 = ref20
  _, _, path56 = ref56
  with pytest.raises(
      UserError,
      match=r"lacks key 'stage1\.block4\..*" r'pass backbone_depth=20',
  ):
    convert.load_official_checkpoint(path20, backbone_depth=56)
  with pytest.raises(
      UserError,
      match=r"unexpected key 'stage1\.block4\..*" r'pass backbone_depth=56',
  ):
    convert.load_official_checkpoint(path56, backbone_depth=20)
  with pytest.raises(UserError, match='6n\\+2'):
    convert.load_official_checkpoint(path20, backbone_depth=21)


def test_bad_keys_and_shapes(ref20):
  backbone, gater, _ = ref20
  bsd, gsd = numpy_state_dicts(backbone, gater)

  missing = dict(gsd)
  del missing['resnet.newfc.bias']
  with pytest.raises(
      UserError, match=r"gater_state_dict lacks key 'resnet\.newfc\.bias'"
  ):
    convert.convert_state_dicts(bsd, missing, 20)

  extra = dict(bsd, **{'se.fc1.weight': np.zeros((4, 16), np.float32)})
  with pytest.raises(UserError, match=r"unexpected key 'se\.fc1\.weight'"):
    convert.convert_state_dicts(extra, gsd, 20)

  # A CIFAR-100 head does not fit the 10-class model.
  misshaped = dict(bsd, **{'fc.weight': np.zeros((100, 64), np.float32)})
  with pytest.raises(
      UserError,
      match=r"'fc\.weight' has shape \(100, 64\)" r'.*needs \(10, 64\)',
  ):
    convert.convert_state_dicts(misshaped, gsd, 20)

  with pytest.raises(UserError, match="lacks 'gater_state_dict'"):
    convert.load_official_checkpoint({'backbone_state_dict': bsd})


def test_missing_torch_is_a_user_error(ref20, monkeypatch):
  _, _, path = ref20
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` fails.
  with pytest.raises(UserError, match='pip install torch'):
    convert.load_official_checkpoint(path)


def test_import_does_not_need_torch():
  code = (
      'import sys; import gaternet_jax.convert; '
      "assert 'torch' not in sys.modules, 'torch imported eagerly'"
  )
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=120)


def test_official_model_config():
  for depth, total in ((20, 336), (56, 1008)):
    cfg = convert.official_model_config(depth)
    assert not cfg.gater.batchnorm
    model = create_model(cfg, convert.OFFICIAL_NUM_CLASSES)
    assert model.gate_spec().total == total
  assert convert.OFFICIAL_MEAN == (0.4914, 0.4822, 0.4465)
  assert convert.OFFICIAL_STD == (0.2470, 0.2435, 0.2616)


def test_official_checkpoint_initialises_training_from_config(ref20):
  """The config path main.py uses (init.official_checkpoint) loads the
  converted weights into a train state of configs/cifar10_r20.py."""
  from configs import cifar  # pylint: disable=g-import-not-at-top
  from gaternet_jax import recipe, sharding  # pylint: disable=g-import-not-at-top
  from gaternet_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  from gaternet_jax.models import create_model  # pylint: disable=g-import-not-at-top

  _, _, path = ref20
  config = cifar.cifar_config('cifar10', 'r20', 'gated')
  config.model.gater.batchnorm = False
  config.init.official_checkpoint = str(path)
  assert recipe.pretraining_stages(config, '/unused') == []
  model = create_model(config.model, 10)
  state = steps_lib.create_train_state(
      config,
      model,
      (32, 32, 3),
      lambda s: 0.1,
      jax.random.key(0),
      sharding.create_mesh(),
  )
  state = recipe.official_init(config)(state)
  _, want = convert.load_official_checkpoint(path, backbone_depth=20)
  for got_tree, want_tree in (
      (state.params, want['params']),
      (state.batch_stats, want['batch_stats']),
  ):
    got_l, got_t = jax.tree_util.tree_flatten(got_tree)
    want_l, want_t = jax.tree_util.tree_flatten(want_tree)
    assert got_t == want_t
    for a, b in zip(got_l, want_l):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # With the paper's gater BatchNorm the layers differ: a clear error.
  config.model.gater.batchnorm = True
  model = create_model(config.model, 10)
  state = steps_lib.create_train_state(
      config,
      model,
      (32, 32, 3),
      lambda s: 0.1,
      jax.random.key(0),
      sharding.create_mesh(),
  )
  with pytest.raises(UserError):
    recipe.official_init(config)(state)
