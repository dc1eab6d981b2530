"""Several local processes joined by jax.distributed, as on a TPU pod slice.

Two processes of 4 CPU devices each (a localhost coordinator, JAX's CPU
collectives) against one process of 8 devices, through main.py on the
digits demo (both its stages): the same parameters after the first steps
and the same results after a preemption notice to one process, a kill of
both and two restarts. Also: an error on one process stops both with its
sentence, and on a prepared TFDS dataset the processes read disjoint tf.data
shards that cover every example, and resume a crashed run exactly.

The tests of this file share their runs and go to one pytest-xdist worker
(`--dist loadgroup`).
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

pytestmark = pytest.mark.xdist_group('multiprocess')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
# The digits demo, short: 10 steps for each stage. Cross-process sums add
# in another order than in-process ones (the first steps differ by 1e-7),
# and at the demo's learning rate of 0.05 early training amplifies that
# about 300-fold a step (train loss 1e-4 apart at step 5, 1% at step 10).
# At 0.005 the two runs stay close enough for tight tolerances.
STEPS = 10
DIGITS = [
    '--config=configs/default.py',
    f'--config.num_train_steps={STEPS}',
    '--config.optimizer.learning_rate=0.005',
    '--config.checkpoint_every_steps=5',
    '--config.keep_checkpoints=3',
    '--config.log_every_steps=1',
    '--config.eval_every_epochs=1.0',
    '--config.tensorboard=False',
    '--config.progress_every_secs=1000.0',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# On PYTHONPATH: every process, not process 0 alone, writes the compilation
# cache (cache_every_process/sitecustomize.py says why).
CACHE_EVERY_PROCESS = os.path.join(REPO, 'tests', 'cache_every_process')


def _env(devices: int, fast_compile=False, **extra) -> dict:
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
      # XLA's CPU backend optimisations make up most of the tiny programs'
      # compile time (as in test_colab.py): without them each process
      # compiles the tf.data job's init and train steps in a third of the
      # time. The runs compared with each other compile alike.
      + (' --xla_backend_optimization_level=0' if fast_compile else ''),
      PYTHONPATH=os.pathsep.join(
          [CACHE_EVERY_PROCESS]
          + [p for p in [os.environ.get('PYTHONPATH')] if p]
      ),
  )
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  env.update(extra)
  return env


def _start(
    args,
    num_processes=2,
    devices=4,
    flags=True,
    log_dir=None,
    fast_compile=False,
):
  """Starts `args` (after python) as a job of `num_processes` processes."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    if num_processes == 1:
      cmd, env = list(args), _env(devices, fast_compile)
    elif flags:
      cmd = list(args) + [
          f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={num_processes}',
          f'--process_id={i}',
      ]
      env = _env(devices, fast_compile)
    else:
      cmd = list(args)
      env = _env(
          devices,
          fast_compile,
          JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
          JAX_NUM_PROCESSES=str(num_processes),
          JAX_PROCESS_ID=str(i),
      )
    out = (
        open(os.path.join(log_dir, f'process{i}.log'), 'w')
        if log_dir
        else (subprocess.PIPE)
    )
    procs.append(
        subprocess.Popen(
            [sys.executable] + cmd,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    )
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
  return [
      '\n'.join(
          open(os.path.join(log_dir, f'process{i}.log'))
          .read()
          .splitlines()[-40:]
      )
      for i in range(n)
  ]


def _main_job(workdir, num_processes, devices, log_dir):
  os.makedirs(log_dir, exist_ok=True)
  procs = _start(
      ['main.py', f'--workdir={workdir}', *DIGITS],
      num_processes,
      devices,
      log_dir=log_dir,
  )
  codes = [rc for rc, _ in _wait(procs)]
  assert codes == [0] * num_processes, _logs(log_dir, num_processes)
  with open(os.path.join(log_dir, 'process0.log')) as f:
    return json.loads(f.read().strip().splitlines()[-1])


def _wait_for_dir(path, procs, logs):
  deadline = time.time() + TIMEOUT
  while not path.is_dir():
    assert all(p.poll() is None for p in procs), _logs(logs)
    assert time.time() < deadline, f'no {path} in time'
    time.sleep(0.2)


@pytest.fixture(scope='module')
def digits_runs(tmp_path_factory):
  """The short digits demo on 1 process x 8 devices, uninterrupted, and on
  2 x 4: preempted, killed and resumed (see the test below)."""
  root = tmp_path_factory.mktemp('digits')
  one = _main_job(str(root / 'one'), 1, 8, str(root / 'one_logs'))
  workdir = root / 'two'
  logs = str(root / 'two_logs')
  os.makedirs(logs)
  args = ['main.py', f'--workdir={workdir}', *DIGITS]
  # 1. A preemption notice (SIGTERM) reaches process 1 alone, during the
  #    pretraining run: both processes agree on a step, checkpoint it and
  #    stop.
  procs = _start(args, 2, 4, log_dir=logs)
  pretrain = workdir / 'pretrain' / 'baseline' / 'checkpoints'
  _wait_for_dir(pretrain / '5', procs, logs)
  procs[1].send_signal(signal.SIGTERM)
  codes = [rc for rc, _ in _wait(procs)]
  preempted_at = sorted(
      int(p.name) for p in pretrain.iterdir() if p.name.isdigit()
  )
  # 2. Restarted, then both killed once the joint run has its step-5
  #    checkpoint (of 10).
  procs = _start(args, 2, 4, log_dir=logs)
  _wait_for_dir(workdir / 'checkpoints' / '5', procs, logs)
  for p in procs:
    os.killpg(p.pid, signal.SIGKILL)
  _wait(procs)
  killed_results = (workdir / 'results.json').exists()
  # 3. Restarted again, to the end.
  two = _main_job(str(workdir), 2, 4, logs)
  return dict(
      root=root,
      one=one,
      two=two,
      preempted_codes=codes,
      preempted_at=preempted_at,
      killed_results=killed_results,
      log=open(os.path.join(logs, 'process1.log')).read(),
  )


def _train_losses(workdir):
  return [
      r['train/loss']
      for r in map(
          json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()
      )
      if r['kind'] == 'scalars' and 'train/loss' in r
  ]


def test_parameters_after_the_first_steps_match_one_process(digits_runs):
  from gaternet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  root = digits_runs['root']
  params = []
  for run in ('one', 'two'):
    ckpt = checkpoints.Checkpointer(
        str(root / run / 'pretrain' / 'baseline'), read_only=True
    )
    try:
      params.append(ckpt.restore_raw(5))
    finally:
      ckpt.close()
  a, b = params
  assert int(a['step']) == int(b['step']) == 5
  leaves = jax.tree_util.tree_leaves_with_path(
      {'params': a['params'], 'batch_stats': a['batch_stats']}
  )
  others = jax.tree_util.tree_leaves(
      {'params': b['params'], 'batch_stats': b['batch_stats']}
  )
  assert len(leaves) == len(others) > 10
  for (path, x), y in zip(leaves, others):
    np.testing.assert_allclose(
        y, x, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path)
    )


def test_preempted_killed_two_process_run_ends_as_one_process_does(digits_runs):
  r = digits_runs
  one, two, root = r['one'], r['two'], r['root']
  # The preemption: both processes saved the same step and exited 143.
  assert r['preempted_codes'] == [143, 143], r['log'][-3000:]
  assert 5 < r['preempted_at'][-1] < STEPS, r['preempted_at']
  assert not r['killed_results']
  assert 'Resumed' in r['log']
  assert set(two) == {'baseline', 'final'}
  for stage in ('baseline', 'final'):
    assert two[stage]['num_examples'] == one[stage]['num_examples'] == 360
    assert two[stage]['step'] == one[stage]['step'] == STEPS
    assert abs(two[stage]['accuracy'] - one[stage]['accuracy']) <= 0.01
    assert two[stage]['loss'] == pytest.approx(one[stage]['loss'], rel=1e-3)
  assert two['final']['gates_on_fraction'] == pytest.approx(
      one['final']['gates_on_fraction'], rel=0.02
  )
  # Step by step, the train losses of both stages agree, one record a step
  # (those logged after a checkpoint by a killed run were dropped).
  for stage in ('pretrain/baseline', '.'):
    losses = [_train_losses(root / run / stage) for run in ('one', 'two')]
    assert len(losses[0]) == len(losses[1]) == STEPS
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
  # Only process 0 wrote the run's files.
  workdir = root / 'two'
  assert json.loads((workdir / 'results.json').read_text())['accuracy'] == (
      two['final']['accuracy']
  )
  assert (workdir / 'pretrain' / 'baseline' / 'checkpoints').is_dir()
  assert not list(workdir.glob('**/*.tmp'))


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
    procs.append(
        subprocess.Popen(
            [
                sys.executable,
                'main.py',
                f'--workdir={wd}',
                *DIGITS,
                f'--coordinator_address=127.0.0.1:{port}',
                '--num_processes=2',
                f'--process_id={i}',
            ],
            cwd=REPO,
            env=_env(4),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    )
  results = []
  for p in procs:
    out, err = p.communicate(timeout=TIMEOUT)
    results.append((p.returncode, err))
  assert time.time() - t0 < 120
  assert [rc for rc, _ in results] == [1, 1], results
  for _, err in results:
    last = [l for l in err.strip().splitlines() if not l.startswith('[Gloo]')][
        -1
    ]
    assert last.startswith('error: '), err[-2000:]
    assert 'not_a_dir' in last
  assert 'raised on process 1 of 2' in results[0][1]
  assert 'Traceback' not in results[1][1]


def test_distributed_flags_are_checked_before_any_jax_call(tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          'main.py',
          '--config=configs/default.py',
          f'--workdir={tmp_path}',
          '--num_processes=2',
          '--process_id=0',
      ],
      cwd=REPO,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: A multi-process run needs --coordinator_address, '
      '--num_processes and --process_id together; --coordinator_address '
      '(or JAX_COORDINATOR_ADDRESS) not set.'
  )
  proc = subprocess.run(
      [
          sys.executable,
          'main.py',
          '--config=configs/default.py',
          f'--workdir={tmp_path}',
          '--num_processes=2',
          '--process_id=2',
          '--coordinator_address=127.0.0.1:1',
      ],
      cwd=REPO,
      env=_env(1),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --process_id must be in [0, 1] for --num_processes=2; got 2.'
  )


def test_tfdata_shards_of_two_processes_and_their_resume(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  from tests import tiny_imagenet  # pylint: disable=g-import-not-at-top

  data_dir = tiny_imagenet.build(str(tmp_path / 'tfds'))
  out = tmp_path / 'out'
  out.mkdir()
  script = os.path.join(REPO, 'tests', 'multiprocess_tfds.py')
  results = _wait(
      _start([script, data_dir, str(out)], 2, 4, flags=False, fast_compile=True)
  )
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
