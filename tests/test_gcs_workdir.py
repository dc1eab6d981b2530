"""gs:// workdirs and data dirs, against a local Cloud Storage emulator.

The emulator (fake-gcs-server, tests/gcs_emulator.py) serves every layer a
run uses: Orbax (etils epath for its directories, TensorStore for the
arrays), the metrics and JSON files and the analysis figures (epath, over
tf.io.gfile when TensorFlow is installed, as on a TPU VM), and clu's
TensorBoard writer (tf.io.gfile).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600

gcs = gcs_emulator.make_fixture(scope='module')

STEPS = 6
DIGITS = [
    '--config=configs/default.py',
    '--config.model.backbone.widths=(4,8,16)',  # the demo, narrower
    '--config.model.gater.widths=(4,8,16)',
    f'--config.num_train_steps={STEPS}',
    '--config.checkpoint_every_steps=3',
    '--config.log_every_steps=1',
    '--config.eval_every_epochs=1.0',
    '--config.progress_every_secs=1000.0',
    '--config.analysis.tsne_samples=100',
]


def _env(gcs_):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **gcs_.env)
  env.pop('XLA_FLAGS', None)
  return env


def _main(gcs_, workdir, *extra):
  proc = subprocess.run(
      [sys.executable, 'main.py', f'--workdir={workdir}', *DIGITS, *extra],
      cwd=REPO,
      env=_env(gcs_),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _names(gcs_, prefix):
  return sorted(o[len(prefix) :] for o in gcs_.list_objects(prefix))


def test_train_kill_resume_and_analyze_on_a_gs_workdir(gcs, tmp_path):
  url = gcs.unique_url('digits')
  prefix = url[len(f'gs://{gcs.bucket}/') :] + '/'
  # A reference run on the local disk.
  local = _main(gcs, str(tmp_path / 'local'))

  # Killed once the joint run's step-3 checkpoint is in the bucket.
  proc = subprocess.Popen(
      [sys.executable, 'main.py', f'--workdir={url}', *DIGITS],
      cwd=REPO,
      env=_env(gcs),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      start_new_session=True,
  )
  deadline = time.time() + TIMEOUT
  try:
    while not any(
        n.startswith('checkpoints/3/') and n.endswith('_METADATA')
        for n in _names(gcs, prefix)
    ):
      assert proc.poll() is None, proc.communicate()[0][-4000:]
      assert time.time() < deadline
      time.sleep(0.3)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
  names = _names(gcs, prefix)
  assert 'results.json' not in names
  assert 'pretrain/baseline/results.json' in names
  assert not os.path.exists(os.path.join(REPO, 'gs:'))

  resumed = _main(gcs, url)
  for stage in ('baseline', 'final'):
    for k in ('accuracy', 'loss', 'gates_on_fraction', 'macs_mean'):
      if k in local[stage]:
        assert resumed[stage][k] == pytest.approx(local[stage][k], rel=1e-5), (
            stage,
            k,
        )
  names = _names(gcs, prefix)
  assert {
      'config.json',
      'results.json',
      'metrics.jsonl',
      'pretrain/baseline/config.json',
  } <= set(names)
  assert any(n.startswith('events.out.tfevents.') for n in names)
  assert any(n.startswith('checkpoints/6/') for n in names)
  from etils import epath  # pylint: disable=g-import-not-at-top

  results = json.loads(epath.Path(url, 'results.json').read_text())
  assert results['accuracy'] == resumed['final']['accuracy']

  # metrics.jsonl holds each train step once, as the local run's does.
  def train_steps(text):
    return [
        r['step']
        for r in map(json.loads, text.splitlines())
        if r['kind'] == 'scalars' and 'train/loss' in r
    ]

  assert train_steps(epath.Path(url, 'metrics.jsonl').read_text()) == (
      train_steps((tmp_path / 'local' / 'metrics.jsonl').read_text())
  )

  # Analysis reads the gs:// checkpoint and writes its files next to it.
  proc = subprocess.run(
      [
          sys.executable,
          'main.py',
          f'--workdir={url}',
          *DIGITS,
          '--mode=analyze',
      ],
      cwd=REPO,
      env=_env(gcs),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  analysis = json.loads(
      epath.Path(url, 'analysis', 'analysis.json').read_text()
  )
  assert analysis['accuracy'] == pytest.approx(resumed['final']['accuracy'])
  names = _names(gcs, prefix + 'analysis/')
  assert {
      'analysis.json',
      'tsne.png',
      'gate_types_fraction.png',
      'cost_vs_difficulty.png',
  } <= set(names)
  png = epath.Path(url, 'analysis', 'tsne.png').read_bytes()
  assert png.startswith(b'\x89PNG')


def test_a_corrupt_step_on_gs_is_moved_aside_not_deleted(gcs):
  """Cloud Storage has no rename: the corrupt step is copied, then removed."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from gaternet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  url = gcs.unique_url('corrupt')
  prefix = url[len(f'gs://{gcs.bucket}/') :] + '/'
  ckpt = checkpoints.Checkpointer(url, save_every_steps=1)
  for step in (1, 2, 3):
    ckpt.save(step, helpers.dense_train_state(step), train_seconds=step)
  ckpt.close()
  data = epath.Path(url, 'checkpoints', '3', 'default', 'ocdbt.process_0', 'd')
  biggest = max(data.iterdir(), key=lambda f: len(f.read_bytes()))
  biggest.write_bytes(biggest.read_bytes()[:100])  # Truncated.

  def files(folder):
    return {
        n[len(folder) :]: epath.Path(url, n).read_bytes()
        for n in _names(gcs, prefix)
        if n.startswith(folder) and not n.endswith('/')
    }

  before = files('checkpoints/3/')
  ckpt = checkpoints.Checkpointer(url, save_every_steps=1)
  state = ckpt.restore(helpers.dense_train_state())
  assert int(state.step) == 2 and ckpt.train_seconds() == 2.0
  assert ckpt.latest_step() == 2
  ckpt.close()
  assert not files('checkpoints/3/')
  assert files('corrupt_checkpoints/3/') == before


def test_cifar_folder_and_archive_data_dirs_on_gs(gcs, tmp_path):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from gaternet_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  from tests.test_data import _load_folder, _make_tar, _write_tree  # pylint: disable=g-import-not-at-top

  local = tmp_path / 'cifar'
  _write_tree(local, n_train=2, n_test=1)
  url = gcs.unique_url('cifar')
  for path in sorted(local.rglob('*')):
    if path.is_file():
      epath.Path(url, str(path.relative_to(local))).write_bytes(
          path.read_bytes()
      )
  a = _load_folder(str(local))
  b = _load_folder(url)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  # The same tree as one .tar.gz object.
  archive = _make_tar(tmp_path, local, 'cifar.tar.gz')
  tar_url = gcs.unique_url('cifar') + '.tar.gz'
  epath.Path(tar_url).write_bytes(open(archive, 'rb').read())
  c = _load_folder(tar_url)
  np.testing.assert_array_equal(a.train_images, c.train_images)
  with pytest.raises(DataError, match='does not exist'):
    _load_folder(url + '-missing')
