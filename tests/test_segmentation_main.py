"""End to end: segmentation runs through main's modes.

One short run on the synthetic shapes (batch-shaping's local gates and
L0, a CIFAR ResNet-8 encoder under the ASPP head) is shared: it must learn far
above chance, report mIoU and MACs per image, evaluate to the same figures
and analyse (with the per-image MACs vs IoU figure). A second, tiny run
trains on a generated Cityscapes folder in the real layout.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import segmentation as seg_configs
from gaternet_jax import analysis
from gaternet_jax import cli

pytestmark = pytest.mark.xdist_group('segmentation_main')


def _shapes_config():
  c = seg_configs.shapes_config(l0=True)
  c.data.image_size = 32
  c.data.num_train_examples = 1024
  c.data.num_test_examples = 128
  # A CIFAR ResNet-8 encoder: its stride-1 stem keeps 32x32 images at
  # 8x8 (its own output stride, 4) where the ImageNet stem would leave 4x4.
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='cifar_resnet', depth=8, widths=(16, 32, 64), se_reduction=0)
  )
  c.model.segmentation.head_width = 16
  c.model.segmentation.aspp_rates = (1, 2, 3)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_epochs = 6
  c.log_every_steps = 48
  c.checkpoint_every_steps = 96
  c.eval_every_epochs = 1000.0
  c.tensorboard = False
  c.progress_every_secs = 1000.0
  c.analysis.tsne_samples = 64
  c.analysis.dpi = 40
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  # A fixed place: pytest-xdist may tear the module's fixtures down between
  # two of its tests and set them up again; the second setup then finds the
  # finished run and only evaluates it.
  workdir = str(tmp_path_factory.getbasetemp() / 'segmentation_shapes_run')
  results = cli.run('train', _shapes_config(), workdir)
  return workdir, results['final']


def test_short_run_learns_far_above_chance(trained):
  _, r = trained
  # Predicting background everywhere scores about 0.2 here (its IoU is its
  # pixel share, the shapes' 0); random labels about 0.1.
  assert r['miou'] > 0.4, r
  assert r['pixel_accuracy'] > 0.85, r
  assert sum(r[f'iou_class{k}'] > 0.25 for k in (1, 2, 3)) >= 2, r
  assert all(f'iou_class{k}' in r for k in range(4)), r
  # MACs per image next to mIoU, below the dense count once L0 closed gates.
  assert 0 < r['macs_mean'] < r['macs_dense'] + r['macs_overhead'], r
  assert r['gated_filters'] > 0 and 0 < r['gates_on_fraction'] < 1, r


def test_eval_repeats_the_final_figures(trained):
  workdir, r = trained
  out = cli.run('eval', _shapes_config(), workdir)
  for k in ('miou', 'pixel_accuracy', 'macs_mean', 'gates_on_fraction'):
    assert out[k] == pytest.approx(r[k], rel=1e-6), k


def test_analyze_draws_macs_against_iou(trained):
  workdir, r = trained
  out = cli.run('analyze', _shapes_config(), workdir)
  assert out['miou'] == pytest.approx(r['miou'], rel=1e-6)
  assert -1.0 <= out['cost_iou_spearman'] <= 1.0
  with open(os.path.join(out['out_dir'], 'analysis.json')) as f:
    result = json.load(f)
  assert sorted(result['figures']) == sorted(
      {**analysis.FIGURES, **analysis.SEGMENTATION_FIGURES}.values()
  )
  assert os.path.getsize(os.path.join(out['out_dir'], 'cost_vs_iou.png')) > 0
  assert len(result['class_iou']) == 4
  # Per-class rows are keyed by each image's most frequent class besides 0.
  assert {row['label'] for row in result['per_class']} <= {0, 1, 2, 3}


def _write_cityscapes(root, rng):
  ids = np.array([0, 7, 8, 11, 21, 23, 24, 26, 33], np.uint8)
  for split, cities in (('train', ('aachen', 'bonn')), ('val', ('lindau',))):
    for city in cities:
      for frame in range(2):
        stem = f'{city}_{frame:06d}_000019'
        for kind, name, array in (
            (
                'leftImg8bit',
                f'{stem}_leftImg8bit.png',
                rng.integers(0, 256, (32, 64, 3), np.uint8),
            ),
            (
                'gtFine',
                f'{stem}_gtFine_labelIds.png',
                rng.choice(ids, (32, 64)).astype(np.uint8),
            ),
        ):
          folder = os.path.join(root, kind, split, city)
          os.makedirs(folder, exist_ok=True)
          Image.fromarray(array).save(os.path.join(folder, name))


def test_cityscapes_folder_trains_and_evaluates(tmp_path):
  _write_cityscapes(str(tmp_path / 'cityscapes'), np.random.default_rng(0))
  c = seg_configs.cityscapes_config(l0=False)
  c.data.data_dir = str(tmp_path / 'cityscapes')
  c.data.image_size = 16  # 16x32 frames
  c.data.crop_size = (16, 16)
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='cifar_resnet', depth=8, widths=(8, 8, 8), se_reduction=0)
  )
  c.model.segmentation.head_width = 8
  c.batch_size = 2
  c.eval_batch_size = 2
  c.num_train_steps = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  c.tensorboard = False
  out = cli.run('train', c, str(tmp_path / 'run'))['final']
  assert out['split'] == 'val' and out['num_examples'] == 2
  assert 0.0 <= out['miou'] <= 1.0 and out['macs_mean'] > 0
