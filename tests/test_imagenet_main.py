"""The user's ImageNet command on a prepared TFDS data_dir (a tiny one)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('tensorflow_datasets')

from tests import tiny_imagenet  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imagenet_r101_command_on_prepared_tfds_dir(tmp_path):
  data_dir = tiny_imagenet.build(str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  tiny = [
      '--config.data.image_size=32',
      # A ResNet-18 of widths 8..16 stands in for ResNet-101 to keep the
      # test fast on a CPU; every other field is the real config's.
      '--config.model.backbone.depth=18',
      '--config.model.backbone.widths=(8,8,16,16)',
      '--config.model.gater.widths=(8,8,16,16)',
      '--config.model.gater.bottleneck=8',
      '--config.batch_size=4',
      '--config.eval_batch_size=4',
      '--config.num_train_steps=2',
      '--config.data.shuffle_buffer=16',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [
          sys.executable,
          'main.py',
          '--config=configs/imagenet_r101.py',
          f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}',
          *tiny,
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  # The recipe ran: one pretraining run (backbone and gater are the same
  # ResNet-18 here), then joint training, each evaluated on the 6 images.
  assert set(out) == {'baseline', 'final'}
  assert out['final']['num_examples'] == 6
  assert out['final']['split'] == 'validation'
  assert out['final']['gated_filters'] == 2 * (8 + 8 + 16 + 16)
  assert os.path.isdir(
      os.path.join(workdir, 'pretrain', 'baseline', 'checkpoints')
  )
