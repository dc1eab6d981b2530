"""Train- and eval-step throughput of a config and of its ungated backbone.

Both are measured in one process on synthetic batches of the config's image
shape, with compilation timed apart from the steps.
"""

from __future__ import annotations

import time
from typing import Any, Dict

from absl import logging
import jax
import ml_collections
import numpy as np

from gaternet_jax import experiment
from gaternet_jax import gating
from gaternet_jax import optim
from gaternet_jax import sharding


def _measure(
    config: ml_collections.ConfigDict, batch_size: int
) -> Dict[str, float]:
  exp = experiment.setup(config, load_data=False, count_macs=False)
  image_shape, num_classes, mesh = exp.image_shape, exp.num_classes, exp.mesh
  sharding.check_batch_size(batch_size, 'benchmark batch size')
  lr_fn = optim.create_learning_rate_fn(config.optimizer, 100, 10_000)
  state = exp.new_state(lr_fn, jax.random.key(0))
  steps = exp.steps(num_train_steps=10_000)
  rng = np.random.default_rng(0)
  local = sharding.process_slice(batch_size)
  images = rng.integers(0, 256, (batch_size,) + image_shape, np.uint8)[local]
  # Segmentation: a label per pixel (the step crops image and mask).
  label_shape = (batch_size,) + (
      tuple(image_shape[:2]) if exp.task is not None else ()
  )
  labels = rng.integers(0, num_classes, label_shape, np.int32)[local]
  batch = sharding.to_global(
      {'image': images, 'label': labels}, steps.data_sharding
  )
  eval_batch = sharding.to_global(
      {
          'image': images,
          'label': labels,
          'mask': np.ones(len(labels), np.float32),
      },
      steps.data_sharding,
  )
  key = sharding.replicate(jax.random.key(1), mesh)
  out = {}

  t = time.perf_counter()
  train_fn = steps.train.lower(state, batch, key).compile()
  out['train_compile_s'] = time.perf_counter() - t
  t = time.perf_counter()
  eval_fn = steps.eval.lower(state, eval_batch).compile()
  out['eval_compile_s'] = time.perf_counter() - t

  bench = config.benchmark
  for _ in range(bench.warmup_steps):
    state, m = train_fn(state, batch, key)
  jax.block_until_ready((state, m))
  t = time.perf_counter()
  for _ in range(bench.steps):
    state, m = train_fn(state, batch, key)
  jax.block_until_ready((state, m))
  out['train_images_per_s'] = (
      bench.steps * batch_size / (time.perf_counter() - t)
  )

  for _ in range(bench.warmup_steps):
    e = eval_fn(state, eval_batch)
  jax.block_until_ready(e)
  t = time.perf_counter()
  for _ in range(bench.steps):
    e = eval_fn(state, eval_batch)
  jax.block_until_ready(e)
  out['eval_images_per_s'] = (
      bench.steps * batch_size / (time.perf_counter() - t)
  )
  return out


def variants(
    config: ml_collections.ConfigDict,
) -> Dict[str, ml_collections.ConfigDict]:
  """The configs to measure: {'gated': config, 'baseline': its ungated
  backbone} for a gated config (a gater or local gates), {'baseline':
  config} for an ungated one."""
  if not gating.is_gated(config):
    return {'baseline': config}
  return {'gated': config, 'baseline': gating.ungated(config)}


def run_benchmark(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """{'gated': {...}, 'baseline': {...}, 'train_ratio', 'eval_ratio'}.

  The ratios are baseline images/s over the config's images/s (the cost
  of gating, >1 means the gated model is slower).
  """
  batch_size = config.benchmark.batch_size or config.batch_size
  result = {
      'device': jax.devices()[0].device_kind,
      'num_devices': jax.device_count(),
      'batch_size': batch_size,
      'gating': gating.method(config),
  }
  cfgs = variants(config)
  for name, cfg in cfgs.items():
    logging.info('Benchmarking the %s model.', name)
    result[name] = _measure(cfg, batch_size)
  if 'gated' in cfgs:
    for kind in ('train', 'eval'):
      result[f'{kind}_ratio'] = (
          result['baseline'][f'{kind}_images_per_s']
          / result['gated'][f'{kind}_images_per_s']
      )
  return result
