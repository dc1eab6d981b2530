"""The pure train and eval steps, jitted once over a device mesh.

Parameters are replicated, the batch is split over the devices, BatchNorm
statistics are taken over the global batch, the state is donated and no
step syncs with the host.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional

from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from gaternet_jax import augment
from gaternet_jax import device_data
from gaternet_jax import losses
from gaternet_jax import macs as macs_lib
from gaternet_jax import optim
from gaternet_jax import sharding
from gaternet_jax.gates import GateSpec, gate_on_counts, is_on


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def create_train_state(config: ml_collections.ConfigDict, model: Any,
                       image_shape, lr_fn: optax.Schedule, rng: jax.Array,
                       mesh) -> TrainState:
  """Initialises parameters and optimiser state, replicated over the mesh."""
  tx = optim.create_optimizer(config.optimizer, lr_fn)

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
               augmentation: augment.Augmentation,
               gate_dropout_fn: Callable = lambda step: 0.0,
               gate_weights_fn: Optional[Callable] = None):
  """One SGD step on a global batch of uint8 images.

  Args:
    state: the replicated train state (donated).
    batch: {'image': (batch, h, w, c) uint8, 'label': (batch,) int32}.
    rng: the run's base key; this step's key is `fold_in(rng, state.step)`.
    augmentation: the dataset's (`Dataset.augmentation`), applied here.
    gate_weights_fn: step -> batch-shaping and L0 weights (models with
      local gates), or None.

  Returns:
    (new state, dict of scalar metrics).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  aug_rng, gates_rng, dropout_rng = jax.random.split(step_rng, 3)
  images = augment.preprocess(
      batch['image'], mean=mean, std=std, train=True, rng=aug_rng,
      crop_padding=augmentation.crop_padding, flip=augmentation.flip)

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


class Steps:
  """The jitted train and eval steps of one model on one mesh."""

  def __init__(self, config: ml_collections.ConfigDict, spec: GateSpec, mesh,
               mean, std, num_train_steps: int = 1, steps_per_epoch: int = 1,
               mac_counter: Optional[macs_lib.MacCounter] = None, *,
               augmentation: augment.Augmentation):
    self.mesh = mesh
    self.spec = spec
    self.mac_counter = mac_counter
    repl = sharding.replicated(mesh)
    data = sharding.batch_sharded(mesh)
    self.data_sharding = data
    mean, std = tuple(mean), tuple(std)
    step_fn = functools.partial(
        train_step, spec=spec, config=config, mean=mean, std=std,
        augmentation=augmentation,
        gate_dropout_fn=optim.create_gate_dropout_fn(config, num_train_steps),
        gate_weights_fn=optim.create_gate_loss_weights_fn(config, steps_per_epoch))
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

