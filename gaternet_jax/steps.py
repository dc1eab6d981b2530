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
from gaternet_jax import segmentation
from gaternet_jax import sharding
from gaternet_jax.gates import GateSpec, gate_on_counts, is_on
from gaternet_jax.models.backbone import UNSEEN_GATES


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    image_shape,
    lr_fn: optax.Schedule,
    rng: jax.Array,
    mesh,
) -> TrainState:
  """Initialises parameters and optimiser state, replicated over the mesh."""
  tx = optim.create_optimizer(config.optimizer, lr_fn)

  def init(rng):
    params_rng, gates_rng = jax.random.split(rng)
    variables = model.init(
        {'params': params_rng, 'gates': gates_rng},
        jnp.zeros((1,) + tuple(image_shape), jnp.float32),
        train=False,
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables['params'],
        tx=tx,
        batch_stats=variables.get('batch_stats', {}),
    )

  return jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    *,
    loss_fn: Callable,
    spec: GateSpec,
    mean,
    std,
    augmentation: augment.Augmentation | augment.SegmentationAugmentation,
    gate_dropout_fn: Callable = lambda step: 0.0,
    task: Optional[segmentation.Segmentation] = None,
):
  """One SGD step on a global batch of uint8 images.

  Args:
    state: the replicated train state (donated).
    batch: {'image': (batch, h, w, c) uint8, 'label': (batch,) int32}, or
      with a segmentation `task` 'label' (batch, h, w) masks.
    rng: the run's base key; this step's key is `fold_in(rng, state.step)`.
    loss_fn: the run's objective (`losses.objective`).
    augmentation: the dataset's (`Dataset.augmentation`), applied here
      (segmentation: to image and mask together).
    gate_dropout_fn: step -> the gates' dropout rate.
    task: the segmentation task, or None (classification).

  Returns:
    (new state, dict of scalar metrics).
  """
  step_rng = jax.random.fold_in(rng, state.step)
  aug_rng, gates_rng, dropout_rng = jax.random.split(step_rng, 3)
  labels = batch['label']
  if task is not None:
    assert isinstance(augmentation, augment.SegmentationAugmentation)
    images, labels = augment.preprocess_pair(
        batch['image'],
        labels,
        mean=mean,
        std=std,
        rng=aug_rng,
        aug=augmentation,
    )
  else:
    assert isinstance(augmentation, augment.Augmentation)
    images = augment.preprocess(
        batch['image'],
        mean=mean,
        std=std,
        train=True,
        rng=aug_rng,
        crop_padding=augmentation.crop_padding,
        flip=augmentation.flip,
    )

  def loss(params):
    (logits, out), new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        images,
        train=True,
        gate_dropout=gate_dropout_fn(state.step),
        rngs={'gates': gates_rng, 'dropout': dropout_rng},
        mutable=['batch_stats'],
    )
    value, terms = loss_fn(params, logits, out, labels, state.step)
    return value, (logits, out['gates'], new_model_state, terms)

  grads, (logits, gates, new_model_state, terms) = jax.grad(loss, has_aux=True)(
      state.params
  )

  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state['batch_stats']
  )
  if task is not None:
    accuracy = segmentation.pixel_accuracy(logits, labels, task.ignore_label)
  else:
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  out = dict(terms, accuracy=accuracy)
  if spec:
    out['gates_on'] = jnp.mean(is_on(spec.flatten(gates)))
  out[NONFINITE] = nonfinite_code(terms['loss'], new_state)
  return new_state, out


# The train metric that says whether a step left non-finite values: 0 none,
# 1 the loss, 2 the parameters or BatchNorm statistics (with a finite loss).
# The trainer reads it where it fetches the metrics anyway, and never logs it.
NONFINITE = 'nonfinite'


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree_util.tree_leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def nonfinite_code(loss: jax.Array, state: TrainState) -> jax.Array:
  """`NONFINITE`'s value (int32) for a step's loss and its new state."""
  weights_ok = _all_finite((state.params, state.batch_stats))
  return jnp.where(jnp.isfinite(loss), jnp.where(weights_ok, 0, 2), 1).astype(
      jnp.int32
  )


def example_metrics(
    logits: jax.Array,
    out: Mapping[str, Any],
    labels: jax.Array,
    spec: GateSpec,
    mac_counter: Optional[macs_lib.MacCounter] = None,
    task: Optional[segmentation.Segmentation] = None,
) -> Dict[str, jax.Array]:
  """Per-example metrics of a model's outputs, what eval sums and analysis
  keeps: 'loss' (cross-entropy), 'correct' and 'confidence' `(batch,)`;
  with a segmentation `task` per image instead (segmentation.per_image):
  'loss', 'correct' (its pixel accuracy), 'confidence', 'iou', 'label'
  (its most frequent ground-truth class besides class 0) and 'confusion'
  `(batch, classes, classes)`;
  for gated models 'gates' `(batch, total)` bool (on or off) and 'gate_l1'
  `(batch,)` (the mean gate); with a `mac_counter`, 'macs_saved'
  `(batch,)`, the MACs each example's closed gates save."""
  logits = logits.astype(jnp.float32)
  if task is not None:
    p = segmentation.per_image(
        logits, labels, task.num_classes, task.ignore_label
    )
    m = {
        'loss': p['loss'],
        'correct': p['pixel_accuracy'],
        'confidence': p['confidence'],
        'iou': p['iou'],
        'label': p['dominant_label'],
        'confusion': p['confusion'],
    }
  else:
    m = {
        'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        'correct': jnp.argmax(logits, -1) == labels,
        'confidence': jnp.max(jax.nn.softmax(logits), axis=-1),
    }
  if spec:
    flat = spec.flatten(out['gates'])
    m['gates'] = is_on(flat)
    m['gate_l1'] = jnp.mean(flat, axis=-1)
  if mac_counter is not None:
    m['macs_saved'] = jnp.broadcast_to(
        mac_counter.saved_per_sample(out['gates']), labels.shape[:1]
    )
  return m


def predict(state: TrainState, images: jax.Array, mean, std):
  """Evaluation-mode `(logits, out)` of uint8 images."""
  return state.apply_fn(
      {'params': state.params, 'batch_stats': state.batch_stats},
      augment.preprocess(images, mean=mean, std=std),
      train=False,
  )


def eval_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    *,
    spec: GateSpec,
    mean,
    std,
    mac_counter: Optional[macs_lib.MacCounter] = None,
    task: Optional[segmentation.Segmentation] = None,
) -> Dict[str, jax.Array]:
  """Sums of `example_metrics` over the unmasked examples of a padded eval
  batch.

  With a segmentation `task`, 'correct' sums the images' pixel accuracies,
  and 'confusion' `(classes, classes)` int32 counts the valid pixels of
  the global batch (summed over its devices by the jit), for mIoU.

  Returns {'count', 'correct', 'loss_sum'} and, for gated models,
  'gate_l1_sum' and 'gate_on_counts' `(c,)` (per gate, samples with it on);
  with a `mac_counter`, 'macs_saved' `(batch,)`: the MACs each example's
  closed gates save, -1 where the batch is padded; for a compacted model,
  'unseen_gate_images': examples a removed or folded gate would have
  gated otherwise.
  """
  logits, model_out = predict(state, batch['image'], mean, std)
  m = example_metrics(
      logits, model_out, batch['label'], spec, mac_counter, task
  )
  mask = batch['mask']
  out = {
      'count': jnp.sum(mask),
      'correct': jnp.sum(m['correct'] * mask),
      'loss_sum': jnp.sum(m['loss'] * mask),
  }
  if task is not None:
    out['confusion'] = segmentation.total_confusion(m['confusion'], mask)
  if spec:
    out['gate_l1_sum'] = jnp.sum(m['gate_l1'] * mask)
    out['gate_on_counts'] = gate_on_counts(model_out['gates'], spec, mask)
  if mac_counter is not None:
    out['macs_saved'] = jnp.where(mask > 0, m['macs_saved'], -1.0)
  if UNSEEN_GATES in model_out:
    # A compacted model: images whose constant gates left their pattern.
    out['unseen_gate_images'] = jnp.sum((model_out[UNSEEN_GATES] > 0) * mask)
  return out


class Steps:
  """The jitted train and eval steps of one model on one mesh."""

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      spec: GateSpec,
      mesh,
      mean,
      std,
      num_train_steps: int = 1,
      steps_per_epoch: int = 1,
      mac_counter: Optional[macs_lib.MacCounter] = None,
      *,
      augmentation: augment.Augmentation | augment.SegmentationAugmentation,
      task: Optional[segmentation.Segmentation] = None,
  ):
    self.mesh = mesh
    self.spec = spec
    self.mac_counter = mac_counter
    self.task = task
    repl = sharding.replicated(mesh)
    data = sharding.batch_sharded(mesh)
    self.data_sharding = data
    mean, std = tuple(mean), tuple(std)
    step_fn = functools.partial(
        train_step,
        spec=spec,
        mean=mean,
        std=std,
        loss_fn=losses.objective(config, spec, steps_per_epoch),
        augmentation=augmentation,
        gate_dropout_fn=optim.create_gate_dropout_fn(config, num_train_steps),
        task=task,
    )
    self.train = jax.jit(
        step_fn,
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    self.eval = jax.jit(
        functools.partial(
            eval_step,
            spec=spec,
            mean=mean,
            std=std,
            mac_counter=mac_counter,
            task=task,
        ),
        in_shardings=(repl, data),
        out_shardings=repl,
    )

    batch_fn = functools.partial(
        device_data.batch_at,
        batch_size=config.batch_size,
        seed=config.seed + 1,
        mesh=mesh,
    )

    def train_many(state, arrays, rng, num_steps):
      """`num_steps` steps on device-resident data in one call; metrics
      come back stacked, `(num_steps,)` each."""

      def body(state, _):
        return step_fn(state, batch_fn(arrays, state.step), rng)

      return jax.lax.scan(body, state, None, length=num_steps)

    self.train_many = jax.jit(
        train_many,
        in_shardings=(repl, repl, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
        static_argnums=(3,),
    )
