"""Several local processes joined by jax.distributed, as on a TPU pod slice.

Two processes of 4 CPU devices each (a localhost coordinator, JAX's CPU
collectives) against one process of 8 devices: the same first steps, the
same digits demo end to end (both its stages, through main.py), a kill of
both processes and a restart that resumes to the same results, an error
on one process that stops both with its sentence, and tf.data shards of a
prepared TFDS dataset that are disjoint and cover every example.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
# The digits demo, short: 10 steps for each stage. Cross-process sums add
# in another order than in-process ones, and over hundreds of steps the
# rounding differences grow (see the closing note's full-length figures);
# over 10 steps they stay small enough for tight tolerances.
STEPS = 10
DIGITS = ['--config=configs/default.py', f'--config.num_train_steps={STEPS}',
          '--config.checkpoint_every_steps=5', '--config.keep_checkpoints=2',
          '--config.log_every_steps=2', '--config.eval_every_epochs=1.0',
          '--config.tensorboard=False', '--config.progress_every_secs=1000.0']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(extra)
  return env


def _start(args, num_processes=2, devices=4, flags=True, log_dir=None):
  """Starts `args` (after python) as a job of `num_processes` processes."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    if num_processes == 1:
      cmd, env = list(args), _env(devices)
    elif flags:
      cmd = list(args) + [f'--coordinator_address=127.0.0.1:{port}',
                          f'--num_processes={num_processes}',
                          f'--process_id={i}']
      env = _env(devices)
    else:
      cmd = list(args)
      env = _env(devices, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
    out = open(os.path.join(log_dir, f'process{i}.log'), 'w') if log_dir else (
        subprocess.PIPE)
    procs.append(subprocess.Popen([sys.executable] + cmd, cwd=REPO, env=env,
                                  stdout=out, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True))
  return procs


def _wait(procs, timeout=TIMEOUT):
  """[(returncode, output)] once every process has ended."""
  deadline = time.time() + timeout
  results = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        os.killpg(q.pid, signal.SIGKILL)
      raise
    results.append((p.returncode, out or ''))
  return results


def _logs(log_dir, n=2):
  return ['\n'.join(open(os.path.join(log_dir, f'process{i}.log')).read()
                    .splitlines()[-40:]) for i in range(n)]


def _main_job(workdir, num_processes, devices, log_dir):
  os.makedirs(log_dir, exist_ok=True)
  procs = _start(['main.py', f'--workdir={workdir}', *DIGITS],
                 num_processes, devices, log_dir=log_dir)
  codes = [rc for rc, _ in _wait(procs)]
  assert codes == [0] * num_processes, _logs(log_dir, num_processes)
  with open(os.path.join(log_dir, 'process0.log')) as f:
    return json.loads(f.read().strip().splitlines()[-1])


@pytest.fixture(scope='module')
def digits_runs(tmp_path_factory):
  """The short digits demo on 1 process x 8 devices and 2 x 4."""
  root = tmp_path_factory.mktemp('digits')
  one = _main_job(str(root / 'one'), 1, 8, str(root / 'one_logs'))
  two = _main_job(str(root / 'two'), 2, 4, str(root / 'two_logs'))
  return root, one, two


def test_first_steps_match_one_process_of_8_devices(tmp_path):
  script = os.path.join(REPO, 'tests', 'sharded_step.py')
  ref, multi = str(tmp_path / 'one.npz'), str(tmp_path / 'two.npz')
  (rc, out), = _wait(_start([script, ref], 1, 8))
  assert rc == 0, out[-3000:]
  # The coordinator from the environment variables, not flags.
  results = _wait(_start([script, multi], 2, 4, flags=False))
  assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:]
  assert 'devices=8 processes=2' in results[1][1]
  a, b = np.load(ref), np.load(multi)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_digits_demo_on_two_processes_matches_one(digits_runs):
  root, one, two = digits_runs
  assert set(two) == {'baseline', 'final'}
  for stage in ('baseline', 'final'):
    assert two[stage]['num_examples'] == one[stage]['num_examples'] == 360
    assert two[stage]['step'] == one[stage]['step'] == STEPS
    assert abs(two[stage]['accuracy'] - one[stage]['accuracy']) <= 0.01
    assert two[stage]['loss'] == pytest.approx(one[stage]['loss'], rel=1e-3)
  assert two['final']['gates_on_fraction'] == pytest.approx(
      one['final']['gates_on_fraction'], rel=0.02)
  # Only process 0 writes the run's files; the workdir is the one run's.
  workdir = root / 'two'
  assert json.loads((workdir / 'results.json').read_text())['accuracy'] == (
      two['final']['accuracy'])
  records = [json.loads(l) for l in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in records if r['kind'] == 'scalars'
           and 'train/loss' in r]
  assert steps == sorted(set(steps)), 'one writer, one record per step'
  assert (workdir / 'pretrain' / 'baseline' / 'checkpoints').is_dir()
  assert not list(workdir.glob('**/*.tmp'))


def test_killed_two_process_run_resumes_to_the_same_results(digits_runs,
                                                            tmp_path):
  root, _, two = digits_runs
  workdir = tmp_path / 'run'
  logs = str(tmp_path / 'logs')
  os.makedirs(logs)
  procs = _start(['main.py', f'--workdir={workdir}', *DIGITS], 2, 4,
                 log_dir=logs)
  # Kill both once the joint run has its step-5 checkpoint (of 10).
  target = workdir / 'checkpoints' / '5'
  deadline = time.time() + TIMEOUT
  while not target.is_dir():
    assert all(p.poll() is None for p in procs), _logs(logs)
    assert time.time() < deadline, 'no checkpoint 5 in time'
    time.sleep(0.2)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
  _wait(procs)
  assert not (workdir / 'results.json').exists()
  resumed = _main_job(str(workdir), 2, 4, logs)
  assert 'Resumed' in open(os.path.join(logs, 'process1.log')).read()
  for stage in ('baseline', 'final'):
    for k in ('accuracy', 'loss', 'gates_on_fraction', 'macs_mean'):
      if k in two[stage]:
        assert resumed[stage][k] == pytest.approx(two[stage][k], rel=1e-6), (
            stage, k)
  # metrics.jsonl reads as the uninterrupted run's.
  def train_steps(wd):
    return [r['step'] for r in map(json.loads, (wd / 'metrics.jsonl')
                                   .read_text().splitlines())
            if r['kind'] == 'scalars' and 'train/loss' in r]
  assert train_steps(workdir) == train_steps(root / 'two')


def test_an_error_on_one_process_stops_both_with_its_sentence(tmp_path):
  # Process 1 alone is given a workdir it cannot use: its sentence must
  # reach process 0 too, and neither may wait for the other.
  workdir = tmp_path / 'run'
  port = _free_port()
  procs = []
  (tmp_path / 'not_a_dir').write_text('a file')
  t0 = time.time()
  for i in range(2):
    # Process 1's workdir is a file: a user error only it raises.
    wd = str(workdir) if i == 0 else str(tmp_path / 'not_a_dir')
    procs.append(subprocess.Popen(
        [sys.executable, 'main.py', f'--workdir={wd}', *DIGITS,
         f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
         f'--process_id={i}'], cwd=REPO, env=_env(4), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True))
  results = []
  for p in procs:
    out, err = p.communicate(timeout=TIMEOUT)
    results.append((p.returncode, err))
  assert time.time() - t0 < 120
  assert [rc for rc, _ in results] == [1, 1], results
  for _, err in results:
    last = [l for l in err.strip().splitlines() if not l.startswith('[Gloo]')
            ][-1]
    assert last.startswith('error: '), err[-2000:]
    assert 'not_a_dir' in last
  assert 'raised on process 1 of 2' in results[0][1]
  assert 'Traceback' not in results[1][1]


def test_distributed_flags_are_checked_before_any_jax_call(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py',
       f'--workdir={tmp_path}', '--num_processes=2', '--process_id=0'],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: A multi-process run needs --coordinator_address, '
      '--num_processes and --process_id together; --coordinator_address '
      '(or JAX_COORDINATOR_ADDRESS) not set.')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/default.py',
       f'--workdir={tmp_path}', '--num_processes=2', '--process_id=2',
       '--coordinator_address=127.0.0.1:1'],
      cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --process_id must be in [0, 1] for --num_processes=2; got 2.')


def test_tfdata_shards_of_two_processes_and_their_resume(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from tests import tiny_imagenet  # pylint: disable=g-import-not-at-top
  data_dir = tiny_imagenet.build(str(tmp_path / 'tfds'))
  out = tmp_path / 'out'
  out.mkdir()
  script = os.path.join(REPO, 'tests', 'multiprocess_tfds.py')
  results = _wait(_start([script, data_dir, str(out)], 2, 4, flags=False))
  assert [rc for rc, _ in results] == [0, 0], results[0][1][-4000:]
  shards = [json.loads((out / f'shard{i}.json').read_text()) for i in (0, 1)]
  # Disjoint shards that together hold every train example once an epoch,
  # each process yielding its 4 rows of every global batch of 8.
  a, b = (set(s['hashes']) for s in shards)
  assert len(a) == len(shards[0]['hashes']) == 8 and len(b) == 8
  assert not a & b
  assert len(a | b) == shards[0]['num_train_examples'] == 16
  assert shards[0]['steps'] == shards[1]['steps'] == 2
  assert all(s['shapes'] == [[4, 32, 32, 3]] * 2 for s in shards)
  # The crashed and resumed 2-process run ends where the uninterrupted one
  # does.
  r = json.loads((out / 'results.json').read_text())
  assert r['ref']['step'] == r['resumed']['step'] == 5
  assert r['ref']['num_examples'] == 6
  for k in ('accuracy', 'loss', 'gates_on_fraction', 'macs_mean'):
    assert r['resumed'][k] == pytest.approx(r['ref'][k], rel=1e-6), k
