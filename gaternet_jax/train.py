"""Training and evaluation: pure step functions and the loop around them.

`train_and_evaluate(config, workdir)` runs GaterNet's whole recipe (the
pretraining stages of section 3.3, then joint training); `train(...)` runs
one stage. Steps are jitted once over a device mesh: parameters replicated,
the batch split over devices, BatchNorm statistics over the global batch,
the state donated, no host sync per step.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gaternet_jax import augment
from gaternet_jax import checkpoints
from gaternet_jax import data as data_lib
from gaternet_jax import device_data
from gaternet_jax import gating
from gaternet_jax import losses
from gaternet_jax import macs as macs_lib
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import paths
from gaternet_jax import recipe
from gaternet_jax import sharding
from gaternet_jax.errors import ConfigError, WorkdirError
from gaternet_jax.gates import (GateSpec, gate_on_counts, gate_type_counts,
                                is_on)
from gaternet_jax.models import create_model


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def create_learning_rate_fn(opt_cfg: ml_collections.ConfigDict,
                            steps_per_epoch: int,
                            num_train_steps: int) -> optax.Schedule:
  """Step ('step': boundaries in epochs), cosine, exponential or constant
  schedule, after an optional warm-up of `warmup_epochs`.

  The warm-up rises linearly to the base rate, or holds `warmup_lr` when
  that is set (He et al.'s ResNet-164 trains at 0.01 for its first ~400
  iterations). Step boundaries and exponential decay count epochs from the
  start of training; the cosine schedule starts after the warm-up and ends
  at 0 on the last step.
  """
  base = opt_cfg.learning_rate
  warmup = int(round(opt_cfg.get('warmup_epochs', 0) * steps_per_epoch))
  warmup_lr = opt_cfg.get('warmup_lr', 0.0) or 0.0
  if warmup_lr < 0:
    raise ConfigError(f'optimizer.warmup_lr must be >= 0; got {warmup_lr}.')
  if opt_cfg.schedule == 'step':
    boundaries = {int(round(e * steps_per_epoch)): opt_cfg.lr_decay
                  for e in opt_cfg.lr_boundaries}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif opt_cfg.schedule == 'cosine':
    cosine = optax.cosine_decay_schedule(base, max(num_train_steps - warmup,
                                                   1))
    main = lambda s: cosine(jnp.maximum(s - warmup, 0))
  elif opt_cfg.schedule == 'exponential':
    # Inception-v4: decay by `lr_decay` every `decay_epochs` epochs.
    main = optax.exponential_decay(
        base, max(int(round(opt_cfg.decay_epochs * steps_per_epoch)), 1),
        opt_cfg.lr_decay, staircase=True)
  elif opt_cfg.schedule == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise ConfigError(f'optimizer.schedule must be step, cosine, exponential '
                      f'or constant; got {opt_cfg.schedule!r}.')
  if warmup <= 0:
    return main

  def schedule(s):
    ramp = (jnp.full_like(s, warmup_lr, jnp.float32) if warmup_lr else
            base * (s + 1) / warmup)
    return jnp.where(s < warmup, ramp, main(s))

  return schedule


def create_optimizer(opt_cfg: ml_collections.ConfigDict,
                     lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, or RMSProp as Inception-v4 trains."""
  name = opt_cfg.get('name', 'sgd')
  if name == 'sgd':
    return optax.sgd(lr_fn, momentum=opt_cfg.momentum or None,
                     nesterov=opt_cfg.nesterov)
  if name == 'rmsprop':
    return optax.rmsprop(lr_fn, decay=opt_cfg.rmsprop_decay,
                         eps=opt_cfg.rmsprop_eps, momentum=opt_cfg.momentum)
  raise ConfigError(f'optimizer.name must be sgd or rmsprop; got {name!r}.')


def create_gate_dropout_fn(config: ml_collections.ConfigDict,
                           num_train_steps: int) -> Callable:
  """Scheduled dropout of the gates: 0 at the start, rising linearly to
  `config.model.gate_dropout` at the end of training (Appendix B)."""
  final = float(config.model.get('gate_dropout', 0.0))
  if not 0.0 <= final < 1.0:
    raise ConfigError(f'model.gate_dropout must be in [0, 1); got {final}.')
  if final == 0.0:
    return lambda step: 0.0
  return lambda step: final * jnp.minimum(
      step.astype(jnp.float32) / max(num_train_steps, 1), 1.0)


def create_gate_loss_weights_fn(config: ml_collections.ConfigDict,
                                steps_per_epoch: int) -> Optional[Callable]:
  """step -> {'batch_shaping', 'l0'} weights, or None when both are off."""
  if not gating.gate_losses_enabled(config):
    return None
  bs = config.batch_shaping
  if not (bs.a > 0 and bs.b > 0):
    raise ConfigError(f'batch_shaping.a and .b must be > 0; got {bs.a}, '
                      f'{bs.b}.')
  return lambda step: losses.gate_loss_weights(config, step, steps_per_epoch)


def create_train_state(config: ml_collections.ConfigDict, model: Any,
                       image_shape, lr_fn: optax.Schedule, rng: jax.Array,
                       mesh) -> TrainState:
  """Initialises parameters and optimiser state, replicated over the mesh."""
  tx = create_optimizer(config.optimizer, lr_fn)

  def init(rng):
    params_rng, gates_rng = jax.random.split(rng)
    variables = model.init({'params': params_rng, 'gates': gates_rng},
                           jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                           train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             tx=tx,
                             batch_stats=variables.get('batch_stats', {}))

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def train_step(state: TrainState, batch: Mapping[str, jax.Array],
               rng: jax.Array, *, spec: GateSpec,
               config: ml_collections.ConfigDict, mean, std,
               gate_dropout_fn: Callable = lambda step: 0.0,
               gate_weights_fn: Optional[Callable] = None):
  """One SGD step on a global batch of uint8 images.

  Args:
    state: the replicated train state (donated).
    batch: {'image': (batch, h, w, c) uint8, 'label': (batch,) int32}.
    rng: the run's base key; this step's key is `fold_in(rng, state.step)`.
    gate_weights_fn: step -> batch-shaping and L0 weights (models with
      local gates), or None.

  Returns:
    (new state, dict of scalar metrics).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  aug_rng, gates_rng, dropout_rng = jax.random.split(step_rng, 3)
  images = augment.preprocess(
      batch['image'], mean=mean, std=std, train=True, rng=aug_rng,
      crop_padding=config.data.crop_padding, flip=config.data.flip)

  def loss_fn(params):
    (logits, gates), new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, gate_dropout=gate_dropout_fn(state.step),
        rngs={'gates': gates_rng, 'dropout': dropout_rng},
        mutable=['batch_stats', 'intermediates'])
    loss, terms = losses.total_loss(
        logits, batch['label'], gates, spec, params,
        weight_decay=config.weight_decay,
        gate_l1_weight=config.gate_l1_weight,
        label_smoothing=config.get('label_smoothing', 0.0))
    # Auxiliary classifiers (Inception-v4's) sow logits named 'aux_logits'.
    aux = [x for path, x in jax.tree_util.tree_leaves_with_path(
        new_model_state.get('intermediates', {}))
           if 'aux_logits' in jax.tree_util.keystr(path)]
    if aux:
      terms['aux_cross_entropy'] = sum(
          losses.cross_entropy(a, batch['label'],
                               label_smoothing=config.get(
                                   'label_smoothing', 0.0)) for a in aux)
      loss = loss + config.get('aux_loss_weight', 0.0) * terms[
          'aux_cross_entropy']
    if gate_weights_fn is not None:
      # Local gates sow their relaxed values and on-probabilities.
      inter = new_model_state['intermediates']
      values = spec.flatten(inter['gate_values'][0])
      probs = spec.flatten(inter['gate_probs'][0])
      weights = gate_weights_fn(state.step)
      terms['batch_shaping'] = losses.batch_shaping_loss(
          values, config.batch_shaping.a, config.batch_shaping.b)
      terms['l0'] = losses.l0_loss(probs)
      terms['batch_shaping_weight'] = weights['batch_shaping']
      terms['l0_weight'] = weights['l0']
      loss = (loss + weights['batch_shaping'] * terms['batch_shaping'] +
              weights['l0'] * terms['l0'])
    return loss, (logits, gates, new_model_state, dict(terms, loss=loss))

  grads, (logits, gates, new_model_state, terms) = jax.grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state['batch_stats'])
  out = dict(terms,
             accuracy=jnp.mean(jnp.argmax(logits, -1) == batch['label']))
  if spec:
    out['gates_on'] = jnp.mean(is_on(spec.flatten(gates)))
  return new_state, out


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              spec: GateSpec, mean, std,
              mac_counter: Optional[macs_lib.MacCounter] = None
              ) -> Dict[str, jax.Array]:
  """Sums over the unmasked examples of a padded eval batch.

  Returns {'count', 'correct', 'loss_sum'} and, for gated models,
  'gate_l1_sum' and 'gate_on_counts' `(c,)` (per gate, samples with it on);
  with a `mac_counter`, 'macs_saved' `(batch,)`: the MACs each example's
  closed gates save, -1 where the batch is padded.
  """
  images = augment.preprocess(batch['image'], mean=mean, std=std)
  logits, gates = state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=False)
  mask = batch['mask']
  losses_ = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['label'])
  out = {'count': jnp.sum(mask),
         'correct': jnp.sum((jnp.argmax(logits, -1) == batch['label']) * mask),
         'loss_sum': jnp.sum(losses_ * mask)}
  if spec:
    per_sample = jnp.mean(spec.flatten(gates), axis=-1)
    out['gate_l1_sum'] = jnp.sum(per_sample * mask)
    out['gate_on_counts'] = gate_on_counts(gates, spec, mask)
  if mac_counter is not None:
    saved = jnp.broadcast_to(mac_counter.saved_per_sample(gates),
                             mask.shape)
    out['macs_saved'] = jnp.where(mask > 0, saved, -1.0)
  return out


def summarize_macs(per_sample: np.ndarray,
                   mac_counter: macs_lib.MacCounter) -> Dict[str, float]:
  """Dense and conditional MACs per image, and the reductions.

  `macs_dense` is the ungated backbone's cost, `macs_overhead` what the
  gater (or gating modules) adds, `macs_mean` the mean conditional cost of
  the examples (overhead included) with its spread, `macs_reduction`
  = 1 - macs_mean / macs_dense (what a user saves end to end), and
  `macs_backbone_reduction` the same without the overhead (what the gates
  save in the backbone).
  """
  x = np.asarray(per_sample, np.float64)
  dense = float(mac_counter.dense_backbone)
  overhead = float(mac_counter.dense_gater)
  mean = float(x.mean())
  return {'macs_dense': dense, 'macs_overhead': overhead,
          'macs_mean': mean, 'macs_std': float(x.std()),
          'macs_min': float(x.min()), 'macs_max': float(x.max()),
          'macs_p10': float(np.percentile(x, 10)),
          'macs_p50': float(np.percentile(x, 50)),
          'macs_p90': float(np.percentile(x, 90)),
          'macs_reduction': 1.0 - mean / dense,
          'macs_backbone_reduction': 1.0 - (mean - overhead) / dense}


def summarize_eval(sums: Mapping[str, Any], spec: GateSpec,
                   per_sample_macs: Optional[np.ndarray] = None,
                   mac_counter: Optional[macs_lib.MacCounter] = None
                   ) -> Dict[str, float]:
  """Turns summed eval outputs into the metrics an eval writes."""
  sums = jax.device_get(sums)
  n = float(sums['count'])
  out = {'accuracy': float(sums['correct']) / n,
         'loss': float(sums['loss_sum']) / n, 'num_examples': n}
  if spec:
    counts = np.asarray(sums['gate_on_counts'])
    kinds = gate_type_counts(counts, int(n), spec)['total']
    out.update(gate_l1=float(sums['gate_l1_sum']) / n,
               gates_on_fraction=float(counts.sum()) / (n * spec.total),
               gates_always_on=kinds['always_on'],
               gates_always_off=kinds['always_off'],
               gates_input_dependent=kinds['input_dependent'],
               gated_filters=spec.total)
  if mac_counter is not None and per_sample_macs is not None:
    out.update(summarize_macs(per_sample_macs, mac_counter))
  return out


class Steps:
  """The jitted train and eval steps of one model on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, spec: GateSpec, mesh,
               mean, std, num_train_steps: int = 1, steps_per_epoch: int = 1,
               mac_counter: Optional[macs_lib.MacCounter] = None):
    self.mesh = mesh
    self.spec = spec
    self.mac_counter = mac_counter
    repl = sharding.replicated(mesh)
    data = sharding.batch_sharded(mesh)
    self.data_sharding = data
    mean, std = tuple(mean), tuple(std)
    step_fn = functools.partial(
        train_step, spec=spec, config=config, mean=mean, std=std,
        gate_dropout_fn=create_gate_dropout_fn(config, num_train_steps),
        gate_weights_fn=create_gate_loss_weights_fn(config, steps_per_epoch))
    self.train = jax.jit(
        step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
        donate_argnums=(0,))
    self.eval = jax.jit(
        functools.partial(eval_step, spec=spec, mean=mean, std=std,
                          mac_counter=mac_counter),
        in_shardings=(repl, data), out_shardings=repl)

    batch_fn = functools.partial(device_data.batch_at,
                                 batch_size=config.batch_size,
                                 seed=config.seed + 1, mesh=mesh)

    def train_many(state, arrays, rng, num_steps):
      """`num_steps` steps on device-resident data in one call; metrics
      come back stacked, `(num_steps,)` each."""
      def body(state, _):
        return step_fn(state, batch_fn(arrays, state.step), rng)
      return jax.lax.scan(body, state, None, length=num_steps)

    self.train_many = jax.jit(
        train_many, in_shardings=(repl, repl, repl),
        out_shardings=(repl, repl), donate_argnums=(0,),
        static_argnums=(3,))

  def evaluate(self, state: TrainState, batches: Iterable[Mapping[str, Any]],
               spec: GateSpec) -> Dict[str, float]:
    """Accuracy, loss, gate statistics and MACs over padded eval batches."""
    total, macs = None, []
    for batch in batches:
      out = dict(self.eval(state, sharding.to_global(batch,
                                                     self.data_sharding)))
      if 'macs_saved' in out:
        macs.append(out.pop('macs_saved'))
      total = out if total is None else jax.tree_util.tree_map(
          jnp.add, total, out)
    per_sample = None
    if macs:
      saved = np.concatenate([np.asarray(m, np.float64)
                              for m in jax.device_get(macs)])
      # float64 on the host: exact for any network size.
      per_sample = self.mac_counter.dense_total - saved[saved >= 0]
    return summarize_eval(total, spec, per_sample, self.mac_counter)


def num_steps(config, ds):
  """(steps_per_epoch, num_train_steps) of a config on a dataset.

  Steps per epoch are the dataset's own (`ds.steps_per_epoch`): a streamed
  dataset sharded over processes counts full batches of its smallest shard,
  so the trainer's epoch boundaries (schedules, evals) are the pipeline's.
  """
  steps_per_epoch = ds.steps_per_epoch(config.batch_size)
  total = config.get('num_train_steps', -1)
  if total is None or total <= 0:
    total = int(round(config.num_epochs * steps_per_epoch))
  return steps_per_epoch, total


def create_mac_counter(model: Any, image_shape) -> Optional[
    macs_lib.MacCounter]:
  """The model's MAC counter, or None (logged) if its backbone cannot say
  which convs its gates switch off."""
  try:
    return macs_lib.count(model, image_shape)
  except NotImplementedError as e:
    logging.warning('No MAC accounting: %s', e)
    return None


def _check_loop_config(config: ml_collections.ConfigDict):
  """Raises a ConfigError for a loop field that would hang or lose work."""
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'steps_per_call'):
    value = config.get(key, 1)
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f'{key} must be a whole number >= 1; got {value!r}.')
  if not config.eval_every_epochs > 0:
    raise ConfigError(f'eval_every_epochs must be > 0; got '
                      f'{config.eval_every_epochs!r}.')


def _check_gate_losses(config: ml_collections.ConfigDict, model: Any):
  if gating.gate_losses_enabled(config) and model.gating != gating.LOCAL:
    raise ConfigError(f"batch_shaping and l0 weights need model.gating="
                      f"'local' (units that gate themselves); this model's "
                      f"is {model.gating!r}. Set them to 0 or use local "
                      f"gating (model.local_gating).")


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
          signal.SIGTERM, lambda *_: self._flag.append(True))
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


def _drop_unset(d: Any) -> Any:
  """`d` without entries that are 0, False, '' or empty (config defaults
  that build nothing, such as `se_reduction=0`)."""
  if not isinstance(d, dict):
    return d
  return {k: _drop_unset(v) for k, v in d.items()
          if v not in (0, False, '', None, {}, [])}


def _network(model: Dict[str, Any]) -> Dict[str, Any]:
  """What of a `model` config shapes the trained network: only a GaterNet
  has a gater, SemHash and gate dropout, only local gating has gating
  modules, and unset options build nothing. (A config.json of an older
  version is read in today's terms.)"""
  model = gating.upgrade_model_dict(model)
  if model.get('gating') != gating.GATER:
    for k in ('gater', 'semhash', 'gate_dropout'):
      model.pop(k, None)
  if model.get('gating') != gating.LOCAL:
    model.pop('local_gating', None)
  return _drop_unset(model)


def _check_workdir_path(workdir: str):
  path = paths.resolve(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir {workdir} is a file, not a directory; '
                       f'choose another --workdir.')


def _check_workdir_config(config: ml_collections.ConfigDict, workdir: str):
  """Refuses to resume a workdir that was written by a different model."""
  path = paths.join(workdir, 'config.json')
  if not paths.resolve(path).exists():
    return
  old = paths.read_json(path)
  new = json.loads(config.to_json_best_effort())
  for key in ('model', 'data'):
    old_part, new_part = dict(old.get(key, {})), dict(new.get(key, {}))
    if key == 'model':
      old_part, new_part = _network(old_part), _network(new_part)
    if key == 'data':  # Where the data lives may change between machines.
      for k in ('data_dir',):
        old_part.pop(k, None)
        new_part.pop(k, None)
    if old_part != new_part:
      raise WorkdirError(
          f'{workdir} holds a run with a different `{key}` config; resume it '
          f'with its own config ({path}) or choose a new --workdir.')


def train(config: ml_collections.ConfigDict, workdir: str,
          init_fn: Optional[Callable[[TrainState], TrainState]] = None,
          dataset: Optional[data_lib.InMemoryDataset] = None,
          step_callback: Optional[Callable[[int], None]] = None
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

  Returns:
    The final evaluation metrics (also written to `workdir/results.json`).
  """
  _check_loop_config(config)
  workdir = str(paths.resolve(workdir))
  _check_workdir_path(workdir)
  paths.resolve(workdir).mkdir(parents=True, exist_ok=True)
  _check_workdir_config(config, workdir)
  ds = dataset if dataset is not None else data_lib.load_dataset(config.data)
  model = create_model(config.model, ds.num_classes)
  _check_gate_losses(config, model)
  spec = model.gate_spec()
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  steps_per_epoch, total_steps = num_steps(config, ds)
  lr_fn = create_learning_rate_fn(config.optimizer, steps_per_epoch,
                                  total_steps)
  rng = jax.random.key(config.seed)
  init_rng, train_rng = jax.random.split(rng)
  state = create_train_state(config, model, ds.image_shape, lr_fn,
                             init_rng, mesh)
  train_rng = sharding.replicate(train_rng, mesh)

  ckpt = checkpoints.Checkpointer(
      workdir, max_to_keep=config.keep_checkpoints,
      save_every_steps=config.checkpoint_every_steps)
  trained_before = 0.0  # Seconds of training before this call.
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    trained_before = ckpt.train_seconds()
    logging.info('Resumed %s at step %d.', workdir, int(state.step))
  else:
    if init_fn is not None:
      state = sharding.replicate(init_fn(state), mesh)
    if jax.process_index() == 0:
      paths.write_json(paths.join(workdir, 'config.json'),
                       json.loads(config.to_json_best_effort()))
  start = int(state.step)

  steps = Steps(config, spec, mesh, ds.mean, ds.std, total_steps,
                steps_per_epoch, create_mac_counter(model, ds.image_shape))
  writer = metrics_lib.create_writer(workdir, config.get('tensorboard', True),
                                     resume_step=start)
  eval_every = max(int(round(config.eval_every_epochs * steps_per_epoch)), 1)
  logging.info('%s: %d train / %d %s examples, %d steps (%d per epoch), '
               'batch %d on %d devices, %d gated filters.', workdir,
               ds.num_train_examples, ds.num_test_examples, ds.test_split_name,
               total_steps, steps_per_epoch, config.batch_size,
               jax.device_count(), spec.total)
  progress = metrics_lib.create_progress(
      total_steps, config.batch_size, writer, config.progress_every_secs,
      first_step=start)

  preempted = _PreemptionCheck()

  results = None
  buffer = []
  on_device = config.data.get('on_device', False)
  if on_device:
    if not hasattr(ds, 'train_images'):
      raise ConfigError('data.on_device needs an in-memory dataset (digits, '
                        'CIFAR); this one is streamed.')
    arrays = device_data.put_on_devices(ds, mesh)
  else:
    batches = ds.train_batches(config.batch_size, config.seed + 1, start)
  events = (config.log_every_steps, eval_every, config.checkpoint_every_steps)
  t0 = time.time()
  trained = trained_before  # Seconds of training up to `step`.
  step = start
  try:
    while step < total_steps:
      if on_device:
        # Run up to the next log/eval/checkpoint step in one call.
        n = min([config.get('steps_per_call', 1), total_steps - step] +
                [(step // e + 1) * e - step for e in events])
        state, m = steps.train_many(state, arrays, train_rng, n)
      else:
        n = 1
        batch = sharding.to_global(next(batches), steps.data_sharding)
        state, m = steps.train(state, batch, train_rng)
      buffer.append(m)
      step += n
      stop = preempted(step)
      progress(step, sync=lambda: jax.block_until_ready(m))
      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = metrics_lib.average(buffer)
        scalars['learning_rate'] = float(lr_fn(step - 1))
        writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
        buffer = []
      if step % eval_every == 0 or step == total_steps:
        results = steps.evaluate(
            state, ds.eval_batches(config.eval_batch_size), spec)
        writer.write_scalars(
            step, {f'{ds.test_split_name}/{k}': v for k, v in results.items()})
      trained = trained_before + time.time() - t0
      if ckpt.save(step, state, force=(step == total_steps) or stop,
                   train_seconds=trained):
        writer.flush()  # Metrics up to a checkpoint outlive a crash.
      if step_callback is not None:
        step_callback(step)
      if stop:
        raise _Preempted()
  except _Preempted:
    logging.warning('SIGTERM: saved a checkpoint at step %d and stopped.',
                    int(state.step))
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
    results = steps.evaluate(
        state, ds.eval_batches(config.eval_batch_size), spec)
  results = dict(results, step=int(state.step), split=ds.test_split_name,
                 train_seconds=trained)
  if not finished_before:  # (metrics.jsonl has a finished run's results.)
    writer.write_texts(int(state.step), {'results': json.dumps(results)})
  writer.close()
  if jax.process_index() == 0:
    paths.write_json(paths.join(workdir, 'results.json'), results)
  logging.info('%s: %s', workdir, results)
  return results


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str,
    dataset: Optional[data_lib.InMemoryDataset] = None) -> Dict[str, Any]:
  """GaterNet's recipe: pretraining stages (if any), then this config's run.

  Args:
    config: the experiment config.
    workdir: this run's directory; pretraining stages without a workdir of
      their own run in `<workdir>/pretrain/<stage>`.
    dataset: an already loaded dataset (else `config.data` is loaded).

  Returns:
    {'final': results of this run, '<stage>': results of each pretraining
    stage}.
  """
  _check_workdir_path(workdir)
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
      out[stage.name] = train(stage.config, stage.workdir, dataset=dataset)
    elif checkpoints.has_checkpoint(stage.workdir):
      logging.info('Pretrained %r: evaluating %s.', stage.name, stage.workdir)
      out[stage.name] = evaluate(stage.config, stage.workdir, dataset=dataset)
    elif resuming:
      logging.info('Pretraining stage %r: %s is gone; %s resumes without it.',
                   stage.name, stage.workdir, workdir)
    else:
      raise WorkdirError(
          f'The pretrained {stage.name} run {stage.workdir} (config.'
          f'pretrain.{stage.targets[0]}_workdir) has no checkpoint; train '
          f'it first or leave the field empty to train it here.')
    init_fns.append(recipe.stage_init(stage))

  def init_fn(state):
    for fn in init_fns:
      state = fn(state)
    return state

  out['final'] = train(config, workdir, init_fn if init_fns else None,
                       dataset=dataset)
  return out


def eval_weights(config: ml_collections.ConfigDict, workdir: str,
                 purpose: str = 'evaluate') -> str:
  """Where the weights to evaluate come from: 'checkpoint' (the latest of
  `workdir`) or 'official' (`config.init.official_checkpoint`); checked
  before any data is loaded."""
  if checkpoints.has_checkpoint(workdir):
    return 'checkpoint'
  if recipe.official_checkpoint(config):
    return 'official'
  raise WorkdirError(f'{workdir} has no checkpoint to {purpose}; train it '
                     f'first with --mode=train (or set '
                     f'config.init.official_checkpoint).')


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str,
                     model: Any, image_shape, mesh, source: str
                     ) -> TrainState:
  """A replicated state holding the weights `eval_weights` named.

  Only the parameters, BatchNorm statistics and step are read, so the run
  may have been trained with another optimiser (a pretraining stage, say).
  """
  state = create_train_state(config, model, image_shape, lambda _: 0.0,
                             jax.random.key(config.seed), mesh)
  if source == 'checkpoint':
    saved = checkpoints.load_variables(workdir)
    params = checkpoints.graft({'root': state.params}, ('root',),
                               saved['params'], f'model in {workdir}')
    stats = checkpoints.graft({'root': state.batch_stats}, ('root',),
                              saved['batch_stats'],
                              f'BatchNorm statistics in {workdir}')
    state = state.replace(step=jnp.asarray(saved['step'], jnp.int32),
                          params=params['root'],
                          batch_stats=stats['root'])
  else:
    state = recipe.official_init(config)(state)
  return sharding.replicate(state, mesh)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             dataset: Optional[data_lib.InMemoryDataset] = None
             ) -> Dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir` (or, when it has none,
  `config.init.official_checkpoint`) on the config's test split."""
  source = eval_weights(config, workdir)
  ds = dataset if dataset is not None else data_lib.load_dataset(config.data)
  model = create_model(config.model, ds.num_classes)
  spec = model.gate_spec()
  mesh = sharding.create_mesh()
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  state = restore_for_eval(config, workdir, model, ds.image_shape, mesh,
                           source)
  steps = Steps(config, spec, mesh, ds.mean, ds.std,
                mac_counter=create_mac_counter(model, ds.image_shape))
  results = steps.evaluate(
      state, ds.eval_batches(config.eval_batch_size), spec)
  results = dict(results, step=int(state.step), split=ds.test_split_name)
  if source == 'checkpoint':
    results['train_seconds'] = checkpoints.train_seconds(workdir)
  return results
