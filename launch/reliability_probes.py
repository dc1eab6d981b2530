"""Tries main.py as a hostile new user would: bad input and faults.

    python launch/reliability_probes.py [--only SUBSTRING] [--keep DIR]

Each probe runs main.py on the digits demo, shrunk to seconds, after
setting up a fault (a bad config value or file, a damaged or mismatched
workdir, a read-only or full disk). A probe expects either a refusal
(exit 1 and one `error:` sentence that names the cause: the words given)
or survival (exit 0, saying what it survived). Each outcome is one of:

  sentence   refused with one sentence naming the cause (as expected)
  survived   went on as expected, and said so
  wrong      a sentence that misses the cause, or a refusal where the run
             should have survived
  traceback  a Python traceback on stderr
  silent     exit 0 where a refusal was expected, or a result that is wrong

The counts are printed last; the exit status is 1 if any probe ended in
traceback, silent or wrong. Read-only and full disks are tmpfs mounts in a
user namespace (`unshare`); where that is not allowed those probes are
skipped. Takes about five minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (
    '--config=configs/default.py',
    '--config.model.backbone.widths=(4,8,16)',
    '--config.model.gater.widths=(4,8,16)',
    '--config.pretrain.enabled=False',
    '--config.num_train_steps=12',
    '--config.checkpoint_every_steps=4',
    '--config.log_every_steps=4',
    '--config.tensorboard=False',
    '--config.analysis.tsne_samples=0',
)


@dataclasses.dataclass
class Probe:
  name: str
  args: Sequence[str]  # after main.py (a '{wd}' is the probe's workdir)
  expect: str  # 'refuse' or 'survive'
  words: Sequence[str] = ()  # the refusal's sentence must hold each
  setup: Optional[Callable[[str], None]] = None  # (workdir) before the run
  check: Optional[Callable[[str, str], bool]] = None  # (workdir, stderr)
  trained: bool = False  # start from a copy of a finished TINY run
  mount: Optional[str] = None  # shell commands run first, in a namespace


def _run(args: Sequence[str], mount: Optional[str] = None):
  command = [sys.executable, 'main.py', *args]
  if mount is not None:
    quoted = ' '.join(f"'{a}'" for a in command)
    command = [
        'unshare',
        '--user',
        '--map-root-user',
        '--mount',
        'bash',
        '-c',
        f'{mount} && exec {quoted}',
    ]
  return subprocess.run(
      command,
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=900,
  )


def _unshare_works() -> bool:
  try:
    return (
        subprocess.run(
            ['unshare', '--user', '--map-root-user', '--mount', 'true'],
            capture_output=True,
        ).returncode
        == 0
    )
  except FileNotFoundError:
    return False


# ---------------------------------------------------------------------------
# Faults.


def _write(relpath: str, data: bytes):
  def setup(wd):
    path = os.path.join(wd, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)

  return setup


def _newest(wd: str) -> str:
  steps = [
      p for p in os.listdir(os.path.join(wd, 'checkpoints')) if p.isdigit()
  ]
  return os.path.join(wd, 'checkpoints', max(steps, key=int))


def _array_files(step_dir: str) -> List[str]:
  files = [
      f
      for f in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True)
      if os.path.isfile(f)
  ]
  return sorted(files, key=os.path.getsize, reverse=True)


def _truncate_arrays(wd):
  for f in _array_files(_newest(wd)):
    with open(f, 'r+b') as fh:
      fh.truncate(os.path.getsize(f) // 2)


def _garble_arrays(wd):
  for f in _array_files(_newest(wd)):
    with open(f, 'r+b') as fh:
      data = bytearray(fh.read())
      for i in range(0, len(data), 7):
        data[i] ^= 0x5A
      fh.seek(0)
      fh.write(data)


def _garble_metadata(wd):
  for f in glob.glob(
      os.path.join(_newest(wd), '**', '*METADATA*'), recursive=True
  ):
    if os.path.isfile(f):
      with open(f, 'wb') as fh:
        fh.write(b'\x00garbage{')


def _empty_newest(wd):
  step = _newest(wd)
  shutil.rmtree(step)
  os.makedirs(os.path.join(os.path.dirname(step), '16'))


def _corrupt_all(wd):
  for step in os.listdir(os.path.join(wd, 'checkpoints')):
    for f in _array_files(os.path.join(wd, 'checkpoints', step)):
      with open(f, 'wb') as fh:
        fh.write(b'')


def _half_trained(wd):
  """A run killed at step 4 of 12 (its step-4 checkpoint only)."""
  for step in ('8', '12'):
    shutil.rmtree(os.path.join(wd, 'checkpoints', step), ignore_errors=True)
  os.remove(os.path.join(wd, 'results.json'))


def _config_file(body: str):
  path = os.path.join(tempfile.mkdtemp(), 'probe_config.py')
  with open(path, 'w') as f:
    f.write(body)
  return path


# ---------------------------------------------------------------------------
# Checks of what survived.


def _said(*words):
  return lambda wd, err: all(w.lower() in err.lower() for w in words)


def _results_finite(wd, err):
  del err
  with open(os.path.join(wd, 'results.json')) as f:
    r = json.load(f)
  return r['step'] == 12 and 0.0 <= r['accuracy'] <= 1.0


def _metrics_line_kept(wd, err):
  with open(os.path.join(wd, 'metrics.jsonl'), 'rb') as f:
    return b'this line is not JSON' in f.read() and 'not JSON' in err


def probes() -> List[Probe]:
  bad = lambda field, value, *words: Probe(
      f'config {field}={value}',
      [*TINY, '--workdir={wd}', f'--config.{field}={value}'],
      'refuse',
      words or (field.split('.')[-1],),
  )
  return [
      # 1. Config values and files.
      bad('batch_size', 0, 'batch_size', '>= 1'),
      bad('batch_size', -5),
      bad('eval_batch_size', 0),
      bad('optimizer.learning_rate', 0, 'learning_rate', '> 0'),
      bad('optimizer.learning_rate', -0.1),
      bad('num_train_steps', 0),
      Probe(
          'config num_epochs=0',
          [
              *TINY,
              '--workdir={wd}',
              '--config.num_train_steps=-1',
              '--config.num_epochs=0',
          ],
          'refuse',
          ('num_epochs',),
      ),
      bad('model.backbone.depth', 0, 'depth'),
      bad('log_every_steps', 0),
      bad('keep_checkpoints', 0),
      bad('optimizer.momentum', 1.5, 'momentum'),
      bad('weight_decay', -1.0),
      bad('optimizer.learnig_rate', 0.1, 'learnig_rate', 'learning_rate'),
      bad('batchsize', 64, 'batchsize', 'batch_size'),
      bad('batch_size', 'abc', 'batch_size', 'abc'),
      Probe(
          'benchmark steps=0',
          [*TINY, '--mode=benchmark', '--config.benchmark.steps=0'],
          'refuse',
          ('benchmark.steps',),
      ),
      Probe(
          'config file without get_config',
          ['--config=' + _config_file('x = 1\n'), '--workdir={wd}'],
          'refuse',
          ('get_config',),
      ),
      Probe(
          'config file with a syntax error',
          ['--config=' + _config_file('def get_config(:\n'), '--workdir={wd}'],
          'refuse',
          ('SyntaxError',),
      ),
      Probe(
          'config file raising in get_config',
          [
              '--config=' + _config_file('def get_config():\n  return 1 / 0\n'),
              '--workdir={wd}',
          ],
          'refuse',
          ('ZeroDivisionError',),
      ),
      Probe(
          'missing config file',
          ['--config=configs/no_such.py', '--workdir={wd}'],
          'refuse',
          ('no_such.py',),
      ),
      Probe(
          '--mode=eval without --workdir',
          [*TINY, '--mode=eval'],
          'refuse',
          ('--workdir',),
      ),
      Probe(
          '--mode=eval of an empty dir',
          [*TINY, '--mode=eval', '--workdir={wd}'],
          'refuse',
          ('no checkpoint',),
      ),
      Probe(
          'cifar folder that does not exist',
          [
              '--config=configs/cifar10_r20.py',
              '--workdir={wd}',
              '--config.data.source=folder',
              '--config.data.data_dir=/no/such/cifar',
          ],
          'refuse',
          ('/no/such/cifar',),
      ),
      # 2. Non-finite values.
      Probe(
          'learning_rate=1e6 (diverges)',
          [*TINY, '--workdir={wd}', '--config.optimizer.learning_rate=1e6'],
          'refuse',
          ('diverged at step', 'learning_rate'),
      ),
      # 3. Workdir paths.
      Probe(
          'workdir is a file',
          [*TINY, '--workdir={wd}/file'],
          'refuse',
          ('is a file',),
          setup=_write('file', b'mine'),
      ),
      Probe(
          "workdir's parent is a file",
          [*TINY, '--workdir={wd}/file/run'],
          'refuse',
          ('Not a directory',),
          setup=_write('file', b'mine'),
      ),
      Probe(
          'read-only disk',
          [*TINY, '--workdir=/mnt/probe/run'],
          'refuse',
          ('Read-only file system',),
          mount='mount -t tmpfs tmpfs /mnt && mkdir /mnt/probe && '
          'mount -o remount,ro /mnt',
      ),
      Probe(
          'disk full after the first checkpoint',
          [*TINY, '--workdir=/mnt/run'],
          'refuse',
          ('MiB free', 'resume from step 4'),
          mount='mount -t tmpfs -o size=600k tmpfs /mnt',
      ),
      # 4. Damaged workdir files (a finished 12-step run: steps 4, 8, 12).
      Probe(
          'truncated arrays in the newest checkpoint (train)',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=_truncate_arrays,
          check=_said('12', 'corrupt'),
          trained=True,
      ),
      Probe(
          'garbled arrays in the newest checkpoint (train)',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=_garble_arrays,
          check=_said('12', 'corrupt'),
          trained=True,
      ),
      Probe(
          'garbled metadata in the newest checkpoint (train)',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=_garble_metadata,
          check=_said('12', 'corrupt'),
          trained=True,
      ),
      Probe(
          'empty newest step folder (train)',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=_empty_newest,
          check=_results_finite,
          trained=True,
      ),
      Probe(
          'truncated arrays in the newest checkpoint (eval)',
          [*TINY, '--workdir={wd}', '--mode=eval'],
          'survive',
          setup=_truncate_arrays,
          check=_said('12', 'corrupt'),
          trained=True,
      ),
      Probe(
          'garbled arrays in the newest checkpoint (analyze)',
          [*TINY, '--workdir={wd}', '--mode=analyze'],
          'survive',
          setup=_garble_arrays,
          check=_said('12', 'corrupt'),
          trained=True,
      ),
      Probe(
          'every checkpoint damaged',
          [*TINY, '--workdir={wd}'],
          'refuse',
          ('corrupt',),
          setup=_corrupt_all,
          trained=True,
      ),
      Probe(
          'garbled config.json',
          [*TINY, '--workdir={wd}'],
          'refuse',
          ('config.json', 'not valid JSON'),
          setup=_write('config.json', b'{"seed": \xff\x00'),
          trained=True,
      ),
      Probe(
          'garbled results.json',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=_write('results.json', b'{"accur'),
          check=_results_finite,
          trained=True,
      ),
      Probe(
          'a garbled metrics.jsonl line',
          [*TINY, '--workdir={wd}'],
          'survive',
          setup=lambda wd: (
              _half_trained(wd),
              open(os.path.join(wd, 'metrics.jsonl'), 'ab').write(
                  b'this line is not JSON\n'
              ),
          ),
          check=_metrics_line_kept,
          trained=True,
      ),
      # 5. Resuming or reading a workdir with another config.
      Probe(
          'resume with another batch size',
          [*TINY, '--workdir={wd}', '--config.batch_size=32'],
          'refuse',
          ('batch_size 64 -> 32', '--allow_config_change'),
          setup=_half_trained,
          trained=True,
      ),
      Probe(
          'resume with another seed',
          [*TINY, '--workdir={wd}', '--config.seed=3'],
          'refuse',
          ('seed 0 -> 3',),
          setup=_half_trained,
          trained=True,
      ),
      Probe(
          'resume with another schedule, allowed',
          [
              *TINY,
              '--workdir={wd}',
              '--config.optimizer.lr_boundaries=(5,10)',
              '--allow_config_change',
          ],
          'survive',
          setup=_half_trained,
          check=_said('changed config', 'lr_boundaries'),
          trained=True,
      ),
      Probe(
          "eval with another model's config",
          [
              *TINY,
              '--workdir={wd}',
              '--mode=eval',
              '--config.model.backbone.depth=14',
          ],
          'refuse',
          ('different `model` config',),
          trained=True,
      ),
      Probe(
          "analyze with another model's config",
          [
              *TINY,
              '--workdir={wd}',
              '--mode=analyze',
              '--config.model.gating=none',
          ],
          'refuse',
          ('different `model` config', 'gating'),
          trained=True,
      ),
      Probe(
          'train a finished run again',
          [*TINY, '--workdir={wd}'],
          'survive',
          check=_results_finite,
          trained=True,
      ),
  ]


def classify(probe: Probe, proc, wd: str) -> str:
  err = proc.stderr
  if 'Traceback' in err:
    return 'traceback'
  last = err.strip().splitlines()[-1] if err.strip() else ''
  if probe.expect == 'refuse':
    if proc.returncode == 0:
      return 'silent'
    if not last.startswith('error: '):
      return 'wrong'
    return 'sentence' if all(w in last for w in probe.words) else 'wrong'
  if proc.returncode != 0:
    return 'wrong'
  try:
    ok = probe.check is None or probe.check(wd, err)
  except (OSError, ValueError, KeyError):
    ok = False
  return 'survived' if ok else 'silent'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='run probes naming this')
  parser.add_argument('--keep', default='', help='keep workdirs here')
  args = parser.parse_args(argv)
  root = args.keep or tempfile.mkdtemp(prefix='probes_')
  namespaces = _unshare_works()
  trained = os.path.join(root, 'trained')
  if not os.path.exists(os.path.join(trained, 'results.json')):
    proc = _run([*TINY, f'--workdir={trained}'])
    if proc.returncode != 0:
      sys.exit(f'The reference run failed:\n{proc.stderr[-3000:]}')
  counts = {}
  failures = []
  t0 = time.time()
  selected = [p for p in probes() if args.only in p.name]
  for i, probe in enumerate(selected, 1):
    wd = os.path.join(root, f'probe{i:02d}')
    if probe.mount is not None and not namespaces:
      print(f'{i:2d}. {probe.name:<52} skipped (no user namespaces)')
      continue
    if probe.trained:
      shutil.copytree(trained, wd)
    else:
      os.makedirs(wd)
    if probe.setup is not None:
      probe.setup(wd)
    proc = _run([a.replace('{wd}', wd) for a in probe.args], mount=probe.mount)
    outcome = classify(probe, proc, wd)
    counts[outcome] = counts.get(outcome, 0) + 1
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''
    print(f'{i:2d}. {probe.name:<52} {outcome:<9} {last[:150]}', flush=True)
    if outcome not in ('sentence', 'survived'):
      failures.append((probe.name, proc.stderr[-2000:]))
  for name, err in failures:
    print(f'\n--- {name}\n{err}')
  print(
      f'\n{sum(counts.values())} probes in {time.time() - t0:.0f}s: '
      + ', '.join(
          f'{counts.get(k, 0)} {k}'
          for k in ('sentence', 'survived', 'wrong', 'traceback', 'silent')
      )
  )
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
