"""A run killed at random moments, over and over, ends as if never stopped.

The digits demo (both stages: the baseline pretraining run, then the joint
one), shrunk to seconds, runs once uninterrupted and once under fire: each
attempt is SIGKILLed (or, one time in three, sent the SIGTERM of a
preemption) at a random moment, and restarted with the same command, at
least KILLS times, before one attempt is let finish. The weights, the
evaluations and every record of metrics.jsonl but the clock's must be
bit-identical to the uninterrupted run's.

The uninterrupted run is `python main.py`; the attempts are forks of a
zygote (tests/zygote.py) that each run main.py as `python main.py` would,
without its seconds of imports.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.zygote import Zygote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 20
SEED = 12
# 12 steps a stage; checkpoints (every 4) off the logging grid (every 3),
# so that resumed runs must carry a cut log window; an eval every 6 steps.
ARGS = [
    '--config=configs/default.py',
    '--config.model.backbone.widths=(4,8,16)',
    '--config.model.gater.widths=(4,8,16)',
    '--config.num_train_steps=12',
    '--config.log_every_steps=3',
    '--config.checkpoint_every_steps=4',
    '--config.eval_every_epochs=0.25',
    '--config.keep_checkpoints=2',
    '--config.tensorboard=False',
    '--config.progress_every_secs=1000',
]
# Fields of metrics.jsonl that tell the time, not the run.
CLOCK = ('time', 'steps_per_sec', 'images_per_sec', 'train_seconds')


def _env():
  return dict(os.environ, JAX_PLATFORMS='cpu')


def _start(workdir, log):
  return subprocess.Popen(
      [sys.executable, 'main.py', f'--workdir={workdir}', *ARGS],
      cwd=REPO,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=log,
      start_new_session=True,
  )


def _records(workdir):
  """metrics.jsonl without the clock: `CLOCK` fields (and records of
  nothing else) left out, `train_seconds` cut from the results texts."""
  out = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rec = json.loads(line)
      if 'results' in rec:
        rec['results'] = {
            k: v
            for k, v in json.loads(rec['results']).items()
            if k not in CLOCK
        }
      rec = {k: v for k, v in rec.items() if k not in CLOCK}
      if set(rec) - {'step', 'kind'}:
        out.append(rec)
  return out


def _arrays(workdir):
  from gaternet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  try:
    raw = ckpt.restore_raw()
  finally:
    ckpt.close()
  return jax.tree_util.tree_leaves_with_path(raw)


def _results(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    return {k: v for k, v in json.load(f).items() if k not in CLOCK}


def _stage_of(log_path, workdir):
  """Which run the attempt was in when killed: 'startup' (no run set up
  yet), 'baseline' or 'joint' (from the setup lines it logged)."""
  with open(log_path, errors='replace') as f:
    text = f.read()
  if (
      f'] {workdir}: ' in text
      and ' train / ' in text.split(f'] {workdir}: ')[-1]
  ):
    return 'joint'
  if ' train / ' in text:
    return 'baseline'
  return 'startup'


def test_killed_at_random_moments_ends_bit_identical(tmp_path):
  ref = str(tmp_path / 'ref')
  with open(tmp_path / 'ref.log', 'w') as log:
    proc = _start(ref, log)
    assert proc.wait(timeout=600) == 0, (tmp_path / 'ref.log').read_text()[
        -3000:
    ]

  workdir = str(tmp_path / 'chaos')
  with Zygote(_env()) as zygote:
    kills, signals, attempt = _attempts(zygote, workdir, tmp_path)
  for run in ('pretrain/baseline', ''):
    a, b = os.path.join(ref, run), os.path.join(workdir, run)
    assert _results(b) == _results(a), run
    assert _records(b) == _records(a), run
    leaves_a, leaves_b = _arrays(a), _arrays(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
      assert np.array_equal(np.asarray(x), np.asarray(y)), (run, path)
  # Nothing half-written was left behind.
  left = [
      os.path.join(root, f)
      for root, _, files in os.walk(workdir)
      for f in files
      if f.endswith('.tmp')
  ]
  assert not left, left
  assert sum(kills.values()) >= KILLS, kills
  assert kills['baseline'] >= 3 and kills['joint'] >= 3, (kills, signals)

  print(f'kills by run: {kills}; attempts {attempt}; {signals}')


def _attempts(zygote, workdir, tmp_path):
  """Attempts, each killed at a random moment (as many as it takes), and
  the last let finish: (kills by run, signals, number of attempts)."""
  rng = random.Random(SEED)
  kills = {'startup': 0, 'baseline': 0, 'joint': 0}
  signals = []
  attempt = 0
  while True:
    attempt += 1
    log_path = str(tmp_path / f'attempt{attempt}.log')
    open(log_path, 'w').close()
    proc = zygote.start([f'--workdir={workdir}', *ARGS], stderr=log_path)
    done = (
        sum(kills.values()) >= KILLS
        and kills['baseline'] >= 3
        and kills['joint'] >= 3
    )
    if not done:
      # A random moment: mostly while training (after a run's setup
      # line), sometimes while the process starts.
      t0 = time.time()
      early = rng.random() < 0.1
      delay = rng.uniform(0.2, 4.0) if early else rng.uniform(0.0, 2.0)
      set_up = early
      while proc.poll() is None:
        if not set_up:
          with open(log_path, errors='replace') as f:
            if ' train / ' in f.read():
              set_up, t0 = True, time.time()
        if set_up and time.time() - t0 >= delay:
          break
        time.sleep(0.02)
      if proc.poll() is None:
        sig = signal.SIGTERM if rng.random() < 1 / 3 else signal.SIGKILL
        stage = _stage_of(log_path, workdir)
        os.killpg(proc.pid, sig)
        rc = proc.wait(timeout=120)
        # Killed, or (SIGTERM while training) checkpointed and stopped.
        assert rc in (-9, -15, 143), open(log_path).read()[-3000:]
        kills[stage] += 1
        signals.append((stage, sig.name, rc))
        continue
    rc = proc.wait(timeout=600)
    text = open(log_path, errors='replace').read()
    assert rc == 0, text[-3000:]
    assert 'Traceback' not in text, text[-3000:]
    if done:
      return kills, signals, attempt


if __name__ == '__main__':
  pytest.main([__file__, '-q', '-s'])
