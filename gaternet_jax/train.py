"""The training loop: one run (`train`, resumable) and GaterNet's recipe
(`train_and_evaluate`: the pretraining stages of section 3.3, then joint
training).

The steps it runs are steps.py's, set up by experiment.py, with optim.py's
schedules; evaluation.py sums the evals.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax
import ml_collections

from gaternet_jax import checkpoints
from gaternet_jax import config_checks
from gaternet_jax import datasets
from gaternet_jax import device_data
from gaternet_jax import evaluation
from gaternet_jax import experiment
from gaternet_jax import fingerprint
from gaternet_jax import gating
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import optim
from gaternet_jax import paths
from gaternet_jax import recipe
from gaternet_jax import resume
from gaternet_jax import sharding
from gaternet_jax import steps as steps_lib
from gaternet_jax.errors import ConfigError, TrainingDiverged, WorkdirError
from gaternet_jax.steps import TrainState


def _check_gate_losses(config: ml_collections.ConfigDict, model: Any):
  if gating.gate_losses_enabled(config) and model.gating != gating.LOCAL:
    raise ConfigError(
        f'batch_shaping and l0 weights need model.gating='
        f"'local' (units that gate themselves); this model's "
        f'is {model.gating!r}. Set them to 0 or use local '
        f'gating (model.local_gating).'
    )


class _Preempted(Exception):
  pass


class _PreemptionCheck:
  """`check(step)`: whether to checkpoint and stop after `step`.

  One process: SIGTERM sets a flag (the handler is ours while training).
  Several: each may be told at a different step, and a checkpoint is a
  collective, so JAX's preemption sync manager (it catches SIGTERM itself)
  picks one step that every process then stops after; Orbax's save asks
  it about the same step ids. (Scanned on-device steps may jump over that
  step: such a run then goes on until it is killed.)
  """

  def __init__(self):
    self._flag = []
    self._previous = None
    self._multi = jax.process_count() > 1
    if self._multi:
      return
    try:
      self._previous = signal.signal(
          signal.SIGTERM, lambda *_: self._flag.append(True)
      )
    except ValueError:  # Not the main thread: no preemption handling.
      pass

  def __call__(self, step: int) -> bool:
    if not self._multi:
      return bool(self._flag)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The runtime's preemption service is off.
      return False

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _initial_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    exp: experiment.Experiment,
    lr_fn,
    rng: jax.Array,
    ckpt: checkpoints.Checkpointer,
    init_fn: Optional[Callable[[TrainState], TrainState]],
    allow_config_change: bool = False,
) -> Tuple[TrainState, Dict[str, Any]]:
  """(the state training starts from, its checkpoint's metadata).

  The latest checkpoint's when `workdir` has one (its config must not
  change the run's trajectory: resume.check); else a fresh state mapped
  by `init_fn` (pretrained weights), and the run's config.json is written.
  """
  state = exp.new_state(lr_fn, rng)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    step = int(state.step)
    resume.check(config, workdir, step, allow_config_change)
    logging.info('Resumed %s at step %d.', workdir, step)
    return state, dict(ckpt.custom_metadata(step))
  if init_fn is not None:
    state = sharding.replicate(init_fn(state), exp.mesh)
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, 'config.json'), resume.as_json(config))
  return state, {}


def _diverged(
    config: ml_collections.ConfigDict,
    step: int,
    code: int,
    lr_fn,
    ckpt: checkpoints.Checkpointer,
) -> TrainingDiverged:
  """The one-sentence error of a step that left non-finite values."""
  what = 'loss' if code == 1 else 'parameters (with a finite loss)'
  last = ckpt.latest_step()
  kept = (
      f'the latest checkpoint, step {last}, holds finite values'
      if last is not None
      else 'no checkpoint was written'
  )
  return TrainingDiverged(
      f'Training diverged at step {step}: the {what} became NaN or Inf at a '
      f'learning rate of {float(lr_fn(step - 1)):.4g}, most likely because '
      f'optimizer.learning_rate ({config.optimizer.learning_rate}) or a loss '
      f'weight is too large; {kept}.'
  )


def _advance_fn(
    config: ml_collections.ConfigDict,
    ds: datasets.Dataset,
    steps: Any,
    mesh,
    rng: jax.Array,
    start: int,
    total_steps: int,
    events: Tuple[int, ...],
) -> Callable:
  """`advance(state, step) -> (state, metrics, n)`: the next `n` train steps.

  From host batches one step a call; with `data.on_device`, from the train
  split held on the devices, running up to the next step in `events` (log,
  eval, checkpoint), at most `steps_per_call`, in one call.
  """
  if not config.data.on_device:
    batches = ds.train_batches(config.batch_size, config.seed + 1, start)

    def from_host(state, step):
      del step
      batch = sharding.to_global(next(batches), steps.data_sharding)
      state, m = steps.train(state, batch, rng)
      return state, m, 1

    return from_host
  arrays = ds.train_arrays()
  if arrays is None:
    raise ConfigError(
        'data.on_device needs an in-memory dataset (digits, '
        'CIFAR); this one is streamed.'
    )
  arrays = device_data.put_on_devices(arrays, mesh)

  def on_device(state, step):
    n = min(
        [config.steps_per_call, total_steps - step]
        + [(step // e + 1) * e - step for e in events]
    )
    state, m = steps.train_many(state, arrays, rng, n)
    return state, m, n

  return on_device


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    init_fn: Optional[Callable[[TrainState], TrainState]] = None,
    dataset: Optional[datasets.Dataset] = None,
    step_callback: Optional[Callable[[int], None]] = None,
    allow_config_change: bool = False,
) -> Dict[str, Any]:
  """Trains one model to `config`'s end, resuming from `workdir` if it can.

  Args:
    config: the experiment config.
    workdir: where checkpoints, metrics.jsonl, config.json and results.json
      are written.
    init_fn: maps the freshly initialised state to the starting one (used to
      load pretrained weights); not called when resuming.
    dataset: an already loaded dataset (else `config.data` is loaded).
    step_callback: called with each finished step number (for tests).
    allow_config_change: resume `workdir` even if `config` changes its
      training trajectory (resume.py); else that is refused.

  Returns:
    The final evaluation metrics (also written to `workdir/results.json`).

  Raises:
    TrainingDiverged: a step left NaN or Inf in the loss or the weights;
      no checkpoint of such a state is written.
  """
  config_checks.check(config, 'train')  # (main.py did; direct callers)
  workdir = str(paths.resolve(workdir))
  paths.check_writable(workdir)
  fingerprint.check_workdir(config, workdir, dataset)
  exp = experiment.setup(config, dataset)
  ds, spec, mesh = exp.ds, exp.spec, exp.mesh
  _check_gate_losses(config, exp.model)
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  steps_per_epoch, total_steps = experiment.num_steps(config, ds)
  lr_fn = optim.create_learning_rate_fn(
      config.optimizer, steps_per_epoch, total_steps
  )
  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  ckpt = checkpoints.Checkpointer(
      workdir,
      max_to_keep=config.keep_checkpoints,
      save_every_steps=config.checkpoint_every_steps,
  )
  state, saved = _initial_state(
      config, workdir, exp, lr_fn, init_rng, ckpt, init_fn, allow_config_change
  )
  trained_before = float(saved.get('train_seconds', 0.0))
  train_rng = sharding.replicate(train_rng, mesh)
  start = int(state.step)

  steps = exp.steps(total_steps, steps_per_epoch)
  writer = metrics_lib.create_writer(
      workdir, config.tensorboard, resume_step=start
  )
  eval_every = max(int(round(config.eval_every_epochs * steps_per_epoch)), 1)
  logging.info(
      '%s: %d train / %d %s examples, %d steps (%d per epoch), '
      'batch %d on %d devices, %d gated filters.',
      workdir,
      ds.num_train_examples,
      ds.num_test_examples,
      ds.test_split_name,
      total_steps,
      steps_per_epoch,
      config.batch_size,
      jax.device_count(),
      spec.total,
  )
  progress = metrics_lib.create_progress(
      total_steps,
      config.batch_size,
      writer,
      config.progress_every_secs,
      first_step=start,
      use_tensorboard=config.tensorboard,
  )

  def evaluate(state):
    return evaluation.run(steps, state, ds.eval_batches(config.eval_batch_size))

  preempted = _PreemptionCheck()
  results = None
  # The train metrics since the last log; a checkpoint between two logs
  # stored the first part of its window.
  window = metrics_lib.TrainWindow.from_json(
      steps_lib.NONFINITE, saved.get('window')
  )
  advance = _advance_fn(
      config,
      ds,
      steps,
      mesh,
      train_rng,
      start,
      total_steps,
      (config.log_every_steps, eval_every, config.checkpoint_every_steps),
  )
  t0 = time.time()
  trained = trained_before  # Seconds of training up to `step`.
  step = start
  try:
    while step < total_steps:
      state, m, n = advance(state, step)
      window.add(step + 1, m)
      step += n
      stop = preempted(step)
      progress(step, sync=lambda m=m: jax.block_until_ready(m))
      trained = trained_before + time.time() - t0
      last = step == total_steps
      log_now = step % config.log_every_steps == 0 or last
      eval_now = step % eval_every == 0 or last
      # Checkpoints stay on their grid (and the last step): only a SIGTERM
      # saves between.
      save_now = step % config.checkpoint_every_steps == 0 or last or stop
      if log_now or eval_now or save_now:
        # Where the host waits for the step anyway: no NaN or Inf reaches
        # the metrics, the evals or a checkpoint.
        bad = window.first_nonfinite()
        if bad is not None:
          raise _diverged(config, *bad, lr_fn, ckpt)
      if log_now:
        scalars = window.pop()
        scalars['learning_rate'] = float(lr_fn(step - 1))
        writer.write_scalars(
            step, {f'train/{k}': v for k, v in scalars.items()}
        )
      if eval_now:
        results = evaluate(state)
        writer.write_scalars(
            step, {f'{ds.test_split_name}/{k}': v for k, v in results.items()}
        )
      if save_now:
        # The records up to this step reach the disk before the checkpoint
        # does: a run resumed from it finds all of them.
        writer.flush()
        pending = window.to_json()
        ckpt.save(
            step,
            state,
            force=True,
            train_seconds=trained,
            metadata={'window': pending} if pending else None,
        )
      if step_callback is not None:
        step_callback(step)
      if stop:
        raise _Preempted()
  except _Preempted:
    logging.warning(
        'SIGTERM: saved a checkpoint at step %d and stopped.', int(state.step)
    )
    writer.close()
    raise SystemExit(143) from None
  except BaseException:
    writer.close()
    raise
  finally:
    preempted.close()
    # Whatever ended the loop, the checkpoint being written (and the old
    # one max_to_keep deletes) are finished before this function returns,
    # so a run started right after finds a settled checkpoints/ directory.
    ckpt.close()
  finished_before = results is None
  if finished_before:  # Nothing left to train: evaluate the restored state.
    results = evaluate(state)
  results = dict(
      results,
      step=int(state.step),
      split=ds.test_split_name,
      train_seconds=trained,
  )
  # Once: a finished run that is re-run (or was killed before this line)
  # finds its results record, or writes it now.
  if not writer.has_record(int(state.step), 'texts', 'results'):
    writer.write_texts(int(state.step), {'results': paths.dumps(results)})
  writer.close()
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, 'results.json'), results)
  logging.info('%s: %s', workdir, results)
  return results


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Optional[datasets.Dataset] = None,
    allow_config_change: bool = False,
) -> Dict[str, Any]:
  """GaterNet's recipe: pretraining stages (if any), then this config's run.

  Args:
    config: the experiment config.
    workdir: this run's directory; pretraining stages without a workdir of
      their own run in `<workdir>/pretrain/<stage>`.
    dataset: an already loaded dataset (else `config.data` is loaded).
    allow_config_change: resume runs whose config changed (`train`).

  Returns:
    {'final': results of this run, '<stage>': results of each pretraining
    stage}.
  """
  paths.check_writable(workdir)
  out = {}
  init_fns = []
  if recipe.official_checkpoint(config):
    init_fns.append(recipe.official_init(config))
  # A joint run that has a checkpoint resumes from it: its pretraining runs
  # are then only reported (where they still exist), never trained again.
  # A run the config names (pretrain.*_workdir) is only read.
  resuming = checkpoints.has_checkpoint(workdir)
  for stage in recipe.pretraining_stages(config, workdir):
    if stage.train and not resuming:
      logging.info('Pretraining stage %r in %s.', stage.name, stage.workdir)
      out[stage.name] = train(
          stage.config,
          stage.workdir,
          dataset=dataset,
          allow_config_change=allow_config_change,
      )
    elif checkpoints.has_checkpoint(stage.workdir):
      logging.info('Pretrained %r: evaluating %s.', stage.name, stage.workdir)
      out[stage.name] = evaluation.evaluate(
          stage.config, stage.workdir, dataset=dataset
      )
    elif resuming:
      logging.info(
          'Pretraining stage %r: %s is gone; %s resumes without it.',
          stage.name,
          stage.workdir,
          workdir,
      )
    else:
      raise WorkdirError(
          f'The pretrained {stage.name} run {stage.workdir} (config.'
          f'pretrain.{stage.targets[0]}_workdir) has no checkpoint; train '
          f'it first or leave the field empty to train it here.'
      )
    init_fns.append(recipe.stage_init(stage))

  def init_fn(state):
    for fn in init_fns:
      state = fn(state)
    return state

  out['final'] = train(
      config,
      workdir,
      init_fn if init_fns else None,
      dataset=dataset,
      allow_config_change=allow_config_change,
  )
  return out
