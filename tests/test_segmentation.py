"""Semantic segmentation: the model's shapes and gate sites, the metric
against brute force, the joint augmentation, MAC accounting, and the
config and data errors (the end-to-end runs are in
test_segmentation_main.py)."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import segmentation as seg_configs
from gaternet_jax import augment
from gaternet_jax import config_checks
from gaternet_jax import data as data_lib
from gaternet_jax import macs as macs_lib
from gaternet_jax import segmentation
from gaternet_jax import shapes
from gaternet_jax.errors import ConfigError, DataError
from gaternet_jax.models import create_model
from gaternet_jax.models.segmentation import adaptive_pool_matrix

IGNORE = 255
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_config(gating, head='aspp', output_stride=8, depth=18):
  c = seg_configs.shapes_config(l0=False)
  c.model.gating = gating
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='imagenet_resnet', depth=depth, widths=(8, 8, 16, 16))
  )
  if gating == 'gater':
    c.model.gater = ml_collections.ConfigDict(
        dict(
            name='cifar_resnet',
            depth=8,
            widths=(8, 8, 8),
            bottleneck=4,
            batchnorm=True,
        )
    )
  c.model.segmentation.update(
      dict(head=head, output_stride=output_stride, head_width=8)
  )
  return c


def _trace(model, shape):
  """(logits shape, out shapes, input shape of the head) of one apply."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.module.name == 'head' and context.method_name == '__call__':
      seen['head_input'] = tuple(args[0].shape)
    return next_fun(*args, **kwargs)

  x = jnp.zeros(shape, jnp.float32)

  def run():
    v = model.init({'params': jax.random.key(0), 'gates': jax.random.key(1)}, x)
    return model.apply(v, x)

  with nn.intercept_methods(interceptor):
    logits, out = jax.eval_shape(run)
  return logits.shape, out, seen['head_input']


@pytest.mark.parametrize('output_stride', [8, 16])
@pytest.mark.parametrize(
    'gating,head,depth',
    [('local', 'aspp', 50), ('gater', 'psp', 18), ('none', 'aspp', 18)],
)
def test_output_shapes_at_both_strides(output_stride, gating, head, depth):
  c = _model_config(gating, head, output_stride, depth)
  model = create_model(c.model, shapes.NUM_CLASSES)
  logits, out, head_input = _trace(model, (2, 64, 96, 3))
  assert logits == (2, 64, 96, shapes.NUM_CLASSES)
  # The encoder's features at the output stride: the last stages dilate.
  assert head_input[1:3] == (64 // output_stride, 96 // output_stride)
  spec = model.gate_spec()
  if gating == 'none':
    assert not spec and out['gates'] == {}
    return
  branches = 5 if head == 'aspp' else 4  # 1x1 + 3 rates + pool; 4 bins
  assert spec.names[-1] == 'head' and spec.sizes[-1] == 8 * branches
  assert {k: v.shape for k, v in out['gates'].items()} == {
      name: (2, size) for name, size in spec.sites
  }


def test_dilation_follows_torchvision():
  c = _model_config('local', depth=50, output_stride=8)
  resnet = create_model(c.model, 4).backbone
  layout = {n: (s, d) for n, s, _, d in resnet.unit_layout()}
  assert layout['stage2_block1'] == (2, 1)
  # Stage 3 stops striding and keeps dilation 1 on its first unit.
  assert layout['stage3_block1'] == (1, 1)
  assert layout['stage3_block2'] == (1, 2)
  assert layout['stage4_block1'] == (1, 2)
  assert layout['stage4_block3'] == (1, 4)


def test_adaptive_pool_matrix_matches_pytorch_bins():
  m = adaptive_pool_matrix(5, 3)  # bins [0, 2), [1, 4), [3, 5)
  np.testing.assert_allclose(m.sum(1), 1.0)
  np.testing.assert_array_equal(
      m > 0, [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]
  )


# ----------------------------------------------------------------------------
# The metric.


def _brute_force(labels, preds, mask, num_classes):
  """Per-class TP / FP / FN over every pixel, by loops."""
  tp, fp, fn = (np.zeros(num_classes) for _ in range(3))
  for b in range(labels.shape[0]):
    if not mask[b]:
      continue
    for y in range(labels.shape[1]):
      for x in range(labels.shape[2]):
        g, p = labels[b, y, x], preds[b, y, x]
        if g == IGNORE:
          continue
        if g == p:
          tp[g] += 1
        else:
          fn[g] += 1
          fp[p] += 1
  ious = [
      tp[c] / (tp[c] + fp[c] + fn[c])
      for c in range(num_classes)
      if tp[c] + fp[c] + fn[c] > 0
  ]
  valid = sum((labels[b] != IGNORE).sum() for b in range(len(mask)) if mask[b])
  return np.mean(ious), tp.sum() / valid, ious


def test_miou_matches_brute_force_with_ignore_and_padding():
  rng = np.random.default_rng(0)
  c = 5
  labels = rng.integers(0, c, (4, 7, 9))
  labels[rng.random(labels.shape) < 0.2] = IGNORE
  labels[..., 0] = 3  # class 4 only ever predicted, never in the truth
  labels[labels == 4] = 2
  preds = rng.integers(0, c, (4, 7, 9))
  mask = np.array([1, 1, 1, 0], np.float32)  # the last row is padding
  cm = segmentation.total_confusion(
      segmentation.image_confusions(
          jnp.asarray(labels), jnp.asarray(preds), c, IGNORE
      ),
      jnp.asarray(mask),
  )
  got = segmentation.scores(np.asarray(cm))
  miou, acc, ious = _brute_force(labels, preds, mask, c)
  assert got['miou'] == pytest.approx(miou, abs=1e-12)
  assert got['pixel_accuracy'] == pytest.approx(acc, abs=1e-12)
  assert [v for v in got['class_iou'] if v is not None] == pytest.approx(ious)
  # Summing batches' matrices is the matrix of the union (the eval's sum).
  halves = sum(
      np.asarray(
          segmentation.total_confusion(
              segmentation.image_confusions(
                  jnp.asarray(labels[s]), jnp.asarray(preds[s]), c, IGNORE
              ),
              jnp.asarray(mask[s]),
          )
      )
      for s in (slice(0, 2), slice(2, 4))
  )
  np.testing.assert_array_equal(halves, cm)


def test_per_image_iou_and_loss_ignore_the_ignored_pixels():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (3, 6, 6))
  labels[:, :2] = IGNORE
  logits = rng.normal(size=(3, 6, 6, 3)).astype(np.float32)
  preds = logits.argmax(-1)
  p = segmentation.per_image(
      jnp.asarray(logits), jnp.asarray(labels), 3, IGNORE
  )
  for b in range(3):
    miou, acc, _ = _brute_force(labels[b : b + 1], preds[b : b + 1], [1], 3)
    assert float(p['iou'][b]) == pytest.approx(miou, rel=1e-6)
    assert float(p['pixel_accuracy'][b]) == pytest.approx(acc, rel=1e-6)
  # Changing the logits of ignored pixels changes neither loss nor metrics.
  moved = logits.copy()
  moved[:, :2] += 100.0 * rng.normal(size=moved[:, :2].shape)
  q = segmentation.per_image(jnp.asarray(moved), jnp.asarray(labels), 3, IGNORE)
  for k in ('loss', 'iou', 'pixel_accuracy'):
    np.testing.assert_allclose(p[k], q[k], rtol=1e-6)
  a = segmentation.pixel_cross_entropy(
      jnp.asarray(logits), jnp.asarray(labels), IGNORE
  )
  b = segmentation.pixel_cross_entropy(
      jnp.asarray(moved), jnp.asarray(labels), IGNORE
  )
  assert float(a) == pytest.approx(float(b), rel=1e-6)


# ----------------------------------------------------------------------------
# The joint augmentation.


def test_augmentation_keeps_image_and_mask_aligned():
  """Images whose channels are their own row and column coordinates (exact
  under bilinear sampling): each augmented pixel's mask value must be the
  source mask at the coordinates its image pixel says it came from."""
  h, w = 20, 28
  rng = np.random.default_rng(2)
  masks = rng.integers(0, 6, (8, h, w)).astype(np.int32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  # The third channel is 1 everywhere: 1 after sampling where every tap
  # fell inside the image (0 outside).
  coords = np.stack([yy, xx, np.ones_like(yy)], -1)
  images = jnp.asarray(np.broadcast_to(coords, (8, h, w, 3)))
  aug = augment.SegmentationAugmentation(
      crop_size=(16, 24), scale_range=(0.6, 1.8), flip=True, ignore_label=IGNORE
  )
  out, out_masks = augment.joint_augment(
      images, jnp.asarray(masks), jax.random.key(3), aug
  )
  out, out_masks = np.asarray(out), np.asarray(out_masks)
  assert out.shape == (8, 16, 24, 3) and out_masks.shape == (8, 16, 24)
  for b in range(8):
    sy, sx = out[b, ..., 0], out[b, ..., 1]
    inside = out[b, ..., 2] > 1 - 1e-6
    assert inside.sum() > 20
    ry = np.floor(sy + 0.5).astype(int)[inside]
    rx = np.floor(sx + 0.5).astype(int)[inside]
    np.testing.assert_array_equal(out_masks[b][inside], masks[b, ry, rx])
    # Outside the image: ignored.
    assert np.all(out_masks[b][out[b, ..., 2] == 0] == IGNORE)
  # A row's column coordinates step by 1 / scale, backwards when flipped:
  # some images were mirrored, some not, at different scales.
  steps = np.array([np.diff(out[b, 8, 2:-2, 1]).mean() for b in range(8)])
  assert (steps < 0).any() and (steps > 0).any(), steps
  assert np.std(np.abs(steps)) > 0.05, steps


def test_identity_augmentation_is_exact():
  images = jnp.asarray(np.random.default_rng(0).random((2, 9, 11, 3)))
  masks = jnp.asarray(np.random.default_rng(1).integers(0, 4, (2, 9, 11)))
  aug = augment.SegmentationAugmentation(crop_size=(9, 11))
  out, out_masks = augment.joint_augment(images, masks, jax.random.key(0), aug)
  np.testing.assert_allclose(out, images, atol=1e-6)
  np.testing.assert_array_equal(out_masks, masks)


# ----------------------------------------------------------------------------
# MACs.


@pytest.mark.parametrize('gating', ['local', 'gater'])
def test_all_open_gates_cost_the_dense_count(gating):
  c = _model_config(gating, 'aspp', 8)
  model = create_model(c.model, shapes.NUM_CLASSES)
  counter = macs_lib.count(model, (64, 96, 3))
  dense = macs_lib.count(model, (64, 96, 3), conditional=False)
  assert counter.dense_backbone == dense.dense_backbone
  spec = model.gate_spec()
  ones = {n: jnp.ones((3, s)) for n, s in spec.sites}
  np.testing.assert_array_equal(counter.saved_per_sample(ones), 0.0)
  # Closing every head gate removes the branch convs and the projection.
  closed = dict(ones, head=jnp.zeros((3, spec.sizes[-1])))
  head_layers = [
      l
      for l in counter.layers
      if l.path[:2] == ('backbone', 'head')
      and l.path[2] != 'gate'
      and l.path[2] != 'classifier'
  ]
  expected = sum(l.macs for l in head_layers)
  np.testing.assert_allclose(
      counter.saved_per_sample(closed), expected, rtol=1e-6
  )
  # The count scales with the image: 4x the pixels, about 4x the MACs.
  bigger = macs_lib.count(model, (128, 192, 3))
  assert 3.5 < bigger.dense_backbone / counter.dense_backbone < 4.5


# ----------------------------------------------------------------------------
# Configs and data errors.


def _one_sentence(message):
  assert message.endswith('.') and '\n' not in message, message
  assert not re.search(r'\.\s+[A-Z]', message), message


def test_task_and_dataset_must_agree():
  c = seg_configs.shapes_config(l0=False)
  c.data.name = 'digits'
  with pytest.raises(ConfigError) as e:
    config_checks.check_model(c)
  _one_sentence(str(e.value))
  c = seg_configs.shapes_config(l0=False)
  c.model.segmentation.enabled = False
  with pytest.raises(ConfigError) as e:
    config_checks.check_model(c)
  _one_sentence(str(e.value))


@pytest.mark.parametrize(
    'field,value',
    [
        ('model.segmentation.output_stride', 12),
        ('model.segmentation.head', 'fpn'),
        ('model.compaction', 'xx'),
    ],
)
def test_bad_segmentation_model_fields_are_one_sentence(field, value):
  c = seg_configs.shapes_config(l0=False)
  section, *rest = field.split('.')
  target = c[section]
  for key in rest[:-1]:
    target = target[key]
  target[rest[-1]] = value
  with pytest.raises(ConfigError) as e:
    create_model(c.model, 4)
  _one_sentence(str(e.value))


@pytest.mark.parametrize(
    'field,value',
    [('scale_range', (2.0, 1.0)), ('crop_size', (0, 5)), ('crop_padding', 4)],
)
def test_bad_segmentation_data_fields_are_one_sentence(field, value):
  cfg = seg_configs.shapes_config(l0=False).data
  cfg[field] = value
  with pytest.raises(ConfigError) as e:
    data_lib.train_augmentation(cfg)
  _one_sentence(str(e.value))


def test_cityscapes_folder_without_labels_is_one_sentence(tmp_path):
  image = tmp_path / 'leftImg8bit' / 'train' / 'aachen'
  image.mkdir(parents=True)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  Image.fromarray(np.zeros((4, 8, 3), np.uint8)).save(
      image / 'aachen_000000_000019_leftImg8bit.png'
  )
  cfg = seg_configs.cityscapes_config(l0=False).data
  cfg.data_dir = str(tmp_path)
  with pytest.raises(DataError) as e:
    data_lib.load_dataset(cfg)
  _one_sentence(str(e.value))
  assert 'gtFine' in str(e.value)


def test_shapes_dataset_is_deterministic_and_labelled():
  a_images, a_masks = shapes.generate(6, 24, seed=3)
  b_images, b_masks = shapes.generate(6, 24, seed=3)
  np.testing.assert_array_equal(a_images, b_images)
  np.testing.assert_array_equal(a_masks, b_masks)
  values = set(np.unique(a_masks))
  assert values <= set(range(shapes.NUM_CLASSES)) | {255}
  assert 0 in values and 255 in values and len(values) >= 4
  c = seg_configs.shapes_config(l0=False)
  c.data.num_train_examples, c.data.num_test_examples = 8, 4
  ds = data_lib.load_dataset(c.data)
  assert ds.image_shape == (64, 64, 3) and ds.num_classes == 4
  batch = next(ds.train_batches(4, seed=0))
  assert batch['label'].shape == (4, 64, 64)
  assert isinstance(ds.augmentation, augment.SegmentationAugmentation)


def test_compaction_and_dynamic_execution_refuse_segmentation_networks():
  from gaternet_jax import dynamic  # pylint: disable=g-import-not-at-top
  from gaternet_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  c = _model_config('local')
  model = create_model(c.model, 4)
  with pytest.raises(UserError) as e:
    dynamic.check_supported(model, 'dynamic execution')
  _one_sentence(str(e.value))
  assert 'segmentation' in str(e.value)
  c.model.compaction = ','.join(
      f'{name}={"*" * size}' for name, size in model.gate_spec().sites
  )
  with pytest.raises(ConfigError) as e:
    create_model(c.model, 4)
  _one_sentence(str(e.value))
  assert 'segmentation head' in str(e.value)


_SHARDED_CONFUSION = """
import numpy as np, jax, jax.numpy as jnp
from gaternet_jax import segmentation, sharding
mesh = sharding.create_mesh()
rng = np.random.default_rng(0)
labels = rng.integers(0, 5, (16, 6, 7)); labels[rng.random(labels.shape) < .2] = 255
preds = rng.integers(0, 5, (16, 6, 7))
mask = (np.arange(16) < 13).astype(np.float32)
data = sharding.batch_sharded(mesh)
fn = jax.jit(lambda l, p, m: segmentation.total_confusion(
                 segmentation.image_confusions(l, p, 5, 255), m),
             in_shardings=(data, data, data),
             out_shardings=sharding.replicated(mesh))
cm = np.asarray(fn(*(jax.device_put(a, data) for a in (labels, preds, mask))))
want = np.zeros((5, 5), np.int64)
for b, l, p in zip(range(16), labels, preds):
  for g, q in zip(l.ravel(), p.ravel()):
    if mask[b] and g != 255:
      want[g, q] += 1
assert (cm == want).all(), (cm, want)
print('devices=%d ok' % jax.device_count())
"""


def test_confusion_matrix_sums_over_8_devices():
  """The eval's confusion matrix, with the batch split over 8 devices, is
  the whole global batch's (padding rows and ignored pixels left out)."""
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  proc = subprocess.run(
      [sys.executable, '-c', _SHARDED_CONFUSION],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'devices=8 ok' in proc.stdout
