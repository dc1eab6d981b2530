"""What a run refuses, and what it survives (issue 12).

Non-finite training stops and keeps its last finite checkpoint; damaged
JSON files get one sentence and metrics.jsonl keeps lines it cannot read;
a config that changes an existing run's trajectory is refused unless
allowed; an unwritable, read-only or full workdir gets one sentence and
leaves nothing half-written. (Config values: test_config_checks.py;
damaged checkpoints: test_checkpoints.py; kills: test_chaos.py.)
"""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gaternet_jax import checkpoints
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import paths
from gaternet_jax import train as train_lib
from gaternet_jax.errors import TrainingDiverged, WorkdirError
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_json(text):
  def refuse(name):
    raise ValueError(f'bare {name} in JSON')

  return json.loads(text, parse_constant=refuse)


def test_non_finite_training_stops_and_keeps_finite_checkpoints(tmp_path):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=True)
  config.optimizer.learning_rate = 1e6
  config.num_train_steps = 8
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  wd = str(tmp_path / 'run')
  with pytest.raises(TrainingDiverged) as e:
    train_lib.train(config, wd, dataset=ds)
  message = str(e.value)
  assert 'diverged at step 3' in message, message
  assert 'optimizer.learning_rate (1000000.0)' in message, message
  assert 'step 2, holds finite values' in message, message
  # No checkpoint of a non-finite state was written; the last is finite.
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2']
  ckpt = checkpoints.Checkpointer(wd, read_only=True)
  try:
    raw = ckpt.restore_raw()
  finally:
    ckpt.close()
  for leaf in jax.tree_util.tree_leaves(raw):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  # metrics.jsonl holds the finite steps only, as valid JSON.
  with open(os.path.join(wd, 'metrics.jsonl')) as f:
    recs = [_strict_json(line) for line in f]
  assert [r['step'] for r in recs if 'train/loss' in r] == [1, 2]
  assert not os.path.exists(os.path.join(wd, 'results.json'))
  # Whatever NaN a result holds is written as null, never as bare NaN.
  assert paths.dumps({'loss': math.nan, 'x': [math.inf, 1.0]}) == (
      '{"loss": null, "x": [null, 1.0]}'
  )


def test_damaged_json_files_are_named_and_metrics_lines_kept(tmp_path):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=False)
  wd = tmp_path / 'run'
  wd.mkdir()
  (wd / 'config.json').write_bytes(b'{"model": {"gating": \x00\xff')
  with pytest.raises(WorkdirError, match=r"run's config .*config.json is da"):
    train_lib.train(config, str(wd), dataset=ds)

  # A run resumed at step 4 drops the records after step 4, and only them:
  # a line that is not a record (garbage, bytes that are not UTF-8, JSON
  # that is no record) stays where it is.
  path = tmp_path / 'metrics.jsonl'
  lines = [
      b'{"step": 2, "kind": "scalars", "train/loss": 1.0}\n',
      b'not json at all\n',
      b'\xff\xfe garbled bytes\n',
      b'[1, 2, 3]\n',
      b'{"step": 4, "kind": "scalars", "train/loss": 0.5}\n',
      b'{"step": 6, "kind": "scalars", "train/loss": 0.25}\n',
      b'{"step": 5, "kind": "texts", "note": "after"}\n',
  ]
  path.write_bytes(b''.join(lines))
  writer = metrics_lib.JsonlWriter(str(path), resume_step=4)
  writer.write_scalars(5, {'train/loss': 0.4})
  writer.close()
  out = path.read_bytes().splitlines(keepends=True)
  assert out[:5] == lines[:5]
  assert len(out) == 6 and json.loads(out[5])['step'] == 5
  assert not list(tmp_path.glob('*.tmp'))


def test_resuming_with_a_changed_trajectory_is_refused_or_allowed(tmp_path):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=False)
  wd = str(tmp_path / 'run')

  class Killed(Exception):
    pass

  def kill_at_3(step):
    if step == 3:
      raise Killed()

  with pytest.raises(Killed):  # a half-finished run, checkpoint at step 2
    train_lib.train(config, wd, dataset=ds, step_callback=kill_at_3)
  stored = open(os.path.join(wd, 'config.json')).read()
  changed = helpers.tiny_config(gated=False)
  changed.batch_size, changed.seed = 8, 1
  changed.log_every_steps = 1  # how the run is watched: may change
  with pytest.raises(WorkdirError) as e:
    train_lib.train(changed, wd, dataset=ds)
  message = str(e.value)
  assert 'at step 2' in message and '--allow_config_change' in message
  assert 'batch_size 16 -> 8' in message and 'seed 0 -> 1' in message
  assert 'log_every_steps' not in message
  assert open(os.path.join(wd, 'config.json')).read() == stored
  # Allowed: the run goes on with the new values, config.json says so and
  # the old one is kept.
  out = train_lib.train(changed, wd, dataset=ds, allow_config_change=True)
  assert out['step'] == 6
  assert json.load(open(os.path.join(wd, 'config.json')))['batch_size'] == 8
  kept = json.load(open(os.path.join(wd, 'config.before_step_2.json')))
  assert kept['batch_size'] == 16 and kept['seed'] == 0
  # The same config again is no change.
  assert train_lib.train(changed, wd, dataset=ds)['step'] == 6


def _unshare_works():
  if not shutil.which('unshare'):
    return False
  probe = subprocess.run(
      ['unshare', '--user', '--map-root-user', '--mount', 'true'],
      capture_output=True,
  )
  return probe.returncode == 0


TINY = [
    '--config=configs/default.py',
    '--config.model.backbone.widths=(4,8,16)',
    '--config.model.gater.widths=(4,8,16)',
    '--config.pretrain.enabled=False',
    '--config.num_train_steps=12',
    '--config.checkpoint_every_steps=4',
    '--config.tensorboard=False',
]


def _main_in(script, workdir, *, mount=None):
  """main.py on TINY with `workdir`, after `mount` (shell commands run
  as root of a new user and mount namespace: a tmpfs of our own)."""
  command = ' '.join(
      [sys.executable, 'main.py', f"'--workdir={workdir}'"]
      + [f"'{a}'" for a in TINY]
  )
  if mount is None:
    argv = ['bash', '-c', command]
  else:
    argv = [
        'unshare',
        '--user',
        '--map-root-user',
        '--mount',
        'bash',
        '-c',
        f'{mount} && {command}; rc=$?; {script}; exit $rc',
    ]
  return subprocess.run(
      argv,
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=600,
  )


def _one_sentence(proc, *words):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for w in words:
    assert w in last, last


def test_processes_checking_one_workdir_at_once_keep_their_own_probe(
    tmp_path,
):
  # The processes of a job check their workdir at the same moment: one
  # may not remove the file another is about to remove.
  code = (
      'import sys\n'
      'from gaternet_jax import paths\n'
      'for _ in range(2000):\n'
      '  paths.check_writable(sys.argv[1])\n'
  )
  procs = [
      subprocess.Popen(
          [sys.executable, '-c', code, str(tmp_path)],
          cwd=REPO,
          stderr=subprocess.PIPE,
          text=True,
      )
      for _ in range(2)
  ]
  for proc in procs:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
  assert not os.listdir(tmp_path)


def test_unusable_workdirs_get_one_sentence_and_nothing_half_written(
    tmp_path,
):
  afile = tmp_path / 'a_file'
  afile.write_text('mine')
  _one_sentence(_main_in('true', str(afile)), 'is a file')
  assert afile.read_text() == 'mine'
  _one_sentence(_main_in('true', str(afile / 'run')), 'Not a directory')
  if not _unshare_works():
    pytest.skip('no user namespaces here to mount a read-only or full disk')
  mnt = tmp_path / 'mnt'
  mnt.mkdir()
  listing = f'find {mnt} -type f | sort'
  # A read-only disk: refused before any data loads or file is written.
  proc = _main_in(
      listing,
      f'{mnt}/parent/run',
      mount=f'mount -t tmpfs tmpfs {mnt} && mount -o remount,ro {mnt}',
  )
  _one_sentence(proc, 'Read-only file system', f'{mnt}/parent')
  # A disk that fills up after the first checkpoint: one sentence, the
  # checkpoint of step 4 intact and nothing half-written.
  proc = _main_in(
      listing, f'{mnt}/run', mount=f'mount -t tmpfs -o size=600k tmpfs {mnt}'
  )
  _one_sentence(proc, 'MiB free', 'resume from step 4')
  files = proc.stdout.split()
  assert f'{mnt}/run/checkpoints/4/_CHECKPOINT_METADATA' in files, files
  assert not [f for f in files if '.tmp' in f or 'orbax-checkpoint-tmp' in f]
  assert f'{mnt}/run/config.json' in files, files
