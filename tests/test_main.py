"""main.py end to end: modes, one-line errors, workdirs never clobbered."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, 'main.py', *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _last_json(stdout):
  return json.loads(stdout.strip().splitlines()[-1])


def _assert_one_line_error(proc, *words):
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') or 'Error' in last, last
  for w in words:
    assert w in last, last


def test_summary_mode_prints_counts_as_last_json_line():
  proc = _main('--config=configs/cifar10_r56.py', '--mode=summary')
  assert proc.returncode == 0, proc.stderr[-2000:]
  s = _last_json(proc.stdout)
  assert s['gated_filters'] == 1008
  assert abs(s['params_total'] / 1e6 - 1.14) <= 0.01
  assert s['params_total'] == s['params_backbone'] + s['params_gater']


def test_benchmark_mode_reports_gated_and_baseline(tmp_path):
  proc = _main(
      '--config=configs/default.py',
      '--mode=benchmark',
      '--config.benchmark.steps=2',
      '--config.benchmark.warmup_steps=1',
      '--config.model.backbone.widths=(4,8,16)',
      '--config.model.gater.widths=(4,8,16)',
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = _last_json(proc.stdout)
  for name in ('gated', 'baseline'):
    assert out[name]['train_images_per_s'] > 0
    assert out[name]['eval_images_per_s'] > 0
    assert out[name]['train_compile_s'] > 0
  assert out['train_ratio'] > 0 and 'baseline/gated' in proc.stdout


def test_missing_dataset_is_one_clear_line(tmp_path):
  proc = _main(
      '--config=configs/cifar10_r20.py',
      f'--workdir={tmp_path}',
      '--config.data.source=folder',
      f'--config.data.data_dir={tmp_path}/nowhere',
  )
  _assert_one_line_error(proc, 'nowhere')


def test_bad_config_value_is_one_clear_line(tmp_path):
  proc = _main(
      '--config=configs/default.py',
      f'--workdir={tmp_path}',
      '--config.optimizer.schedule=linear',
      '--config.pretrain.enabled=False',
  )
  _assert_one_line_error(proc, 'schedule')
  proc = _main(
      '--config=configs/default.py',
      f'--workdir={tmp_path}',
      '--config.batch_size=100000',
      '--config.pretrain.enabled=False',
  )
  _assert_one_line_error(proc, 'batch_size')


def test_missing_config_file_and_workdir():
  proc = _main('--config=configs/nope.py', '--mode=summary')
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert 'nope.py' in proc.stderr
  proc = _main('--config=configs/default.py')
  _assert_one_line_error(proc, '--workdir')


def test_retired_config_variant_names_the_file_to_use():
  # Variants are one file each; the old `file.py:variant` form says which.
  proc = _main('--config=configs/digits_bas.py:l0', '--mode=summary')
  _assert_one_line_error(proc, 'configs/digits_bas_l0.py')
  proc = _main('--config=configs/imagenet_fake.py:r101', '--mode=summary')
  _assert_one_line_error(proc, 'configs/imagenet_fake_r101.py')


def test_workdir_of_another_model_is_refused_and_kept(tmp_path):
  wd = str(tmp_path / 'run')
  common = [
      '--config=configs/default.py',
      f'--workdir={wd}',
      '--config.pretrain.enabled=False',
      '--config.num_train_steps=2',
      '--config.model.backbone.widths=(4,8,16)',
      '--config.model.gater.widths=(4,8,16)',
  ]
  proc = _main(*common)
  assert proc.returncode == 0, proc.stderr[-2000:]
  before = {
      f: os.path.getmtime(os.path.join(root, f))
      for root, _, files in os.walk(wd)
      for f in files
  }
  proc = _main(
      *common[:-2],
      '--config.model.backbone.widths=(8,16,32)',
      '--config.model.gater.widths=(4,8,16)',
  )
  _assert_one_line_error(proc, 'different', 'model')
  after = {
      f: os.path.getmtime(os.path.join(root, f))
      for root, _, files in os.walk(wd)
      for f in files
  }
  assert before == after


def test_out_of_memory_is_one_sentence_about_the_batch(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from gaternet_jax import benchmark, cli  # pylint: disable=g-import-not-at-top
  from gaternet_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  def oom(config):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory allocating 51633771136 bytes.'
    )

  monkeypatch.setattr(benchmark, 'run_benchmark', oom)
  with pytest.raises(
      UserError, match='ran out of memory.*benchmark.batch_size'
  ):
    cli.run('benchmark', default.get_config(), None)

  def other(config):
    raise jax.errors.JaxRuntimeError('INTERNAL: something else')

  monkeypatch.setattr(benchmark, 'run_benchmark', other)
  with pytest.raises(jax.errors.JaxRuntimeError):  # not the user's to fix
    cli.run('benchmark', default.get_config(), None)
