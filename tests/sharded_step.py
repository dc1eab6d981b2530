"""Runs two train steps and one eval on however many devices XLA_FLAGS gives
and writes the resulting state (flattened) to the .npz named by argv[1].
argv[2] 'local' uses batch-shaping's self-gated model with its losses.
Used by test_train.py and test_batch_shaping.py to compare 1 and 8 devices."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from gaternet_jax import evaluation, experiment, optim, sharding  # pylint: disable=g-import-not-at-top
from gaternet_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
from gaternet_jax.models import create_model
from tests import helpers


def main(out_path, variant='gaternet'):
  config = (
      helpers.tiny_local_config()
      if variant == 'local'
      else helpers.tiny_config(gated=True)
  )
  ds = helpers.synthetic_dataset()
  model = create_model(config.model, ds.num_classes)
  spec = model.gate_spec()
  mesh = sharding.create_mesh()
  lr_fn = optim.create_learning_rate_fn(config.optimizer, 4, 8)
  state = steps_lib.create_train_state(
      config, model, (16, 16, 3), lr_fn, jax.random.key(0), mesh
  )
  steps = steps_lib.Steps(
      config,
      spec,
      mesh,
      ds.mean,
      ds.std,
      steps_per_epoch=2,
      mac_counter=experiment.create_mac_counter(model, (16, 16, 3)),
      augmentation=ds.augmentation,
  )
  rng = jax.device_put(jax.random.key(1), sharding.replicated(mesh))
  it = ds.train_batches(config.batch_size, seed=0)
  for _ in range(2):
    state, m = steps.train(
        state, sharding.to_global(next(it), steps.data_sharding), rng
    )
  ev = evaluation.run(steps, state, ds.eval_batches(config.eval_batch_size))
  flat = {}
  for prefix, tree in (
      ('params', state.params),
      ('batch_stats', state.batch_stats),
      ('opt_state', state.opt_state),
      ('metrics', m),
  ):
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      flat[prefix + jax.tree_util.keystr(path)] = np.asarray(x)
  for k in (
      'accuracy',
      'loss',
      'gate_l1',
      'gates_on_fraction',
      'macs_mean',
      'macs_p90',
  ):
    flat['eval_' + k] = np.asarray(ev[k])
  np.savez(out_path, **flat)
  print(f'devices={jax.device_count()}')


if __name__ == '__main__':
  main(*sys.argv[1:])
