"""One process of a multi-process job on a prepared TFDS imagenet2012.

  python tests/multiprocess_tfds.py DATA_DIR OUT_DIR

joins the job named by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, then
  1. writes OUT_DIR/shard<i>.json: the SHA-1 of every encoded record this
     process's tf.data pipeline reads in epoch 0 (what the trainer's epoch
     consumes), and the train batch shapes it yields;
  2. trains a tiny gated ResNet on it through train.train() in
     OUT_DIR/ref, uninterrupted;
  3. trains it again in OUT_DIR/killed, crashing every process after step 3
     (the last checkpoint is step 2), then resumes it; process 0 writes both
     runs' results to OUT_DIR/results.json.
Used by test_multiprocess.py.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections

from configs import imagenet
from gaternet_jax import data as data_lib
from gaternet_jax import distributed
from gaternet_jax import input_pipeline
from gaternet_jax import train as train_lib

# pylint: enable=g-import-not-at-top,wrong-import-position


class Crash(Exception):
  pass


def tiny_config(data_dir):
  c = imagenet.resnet_config(18, 'gated')
  c.data.data_dir = data_dir
  c.data.image_size = 32
  c.data.shuffle_buffer = 16
  # A CIFAR ResNet-8 gated by another: the data path is what is tested, and
  # this compiles in seconds.
  arch = dict(name='cifar_resnet', depth=8, widths=(4, 8, 16))
  c.model.backbone = ml_collections.ConfigDict(dict(arch, se_reduction=0))
  c.model.gater = ml_collections.ConfigDict(
      dict(arch, bottleneck=4, batchnorm=True)
  )
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 5
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.eval_every_epochs = 100.0
  c.tensorboard = False
  c.progress_every_secs = 1000.0
  c.pretrain.enabled = False
  c.model.dtype = 'float32'  # bfloat16 is slow to compile on a CPU.
  return c


def main(data_dir, out_dir):
  assert distributed.initialize(), 'run me as one process of several'
  me = jax.process_index()
  config = tiny_config(data_dir)
  ds = data_lib.load_dataset(config.data)
  assert isinstance(ds, input_pipeline.TfdataDataset)
  # 1. The records of epoch 0, as _epoch_dataset reads them.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  rows = config.batch_size // jax.process_count()
  steps = ds.steps_per_epoch(config.batch_size)
  seeds = input_pipeline._epoch_seeds(config.seed + 1, 0, me)  # pylint: disable=protected-access
  records = ds._source.train_records(  # pylint: disable=protected-access
      tf, seeds, 0, False, config.data.shuffle_buffer
  ).take(steps * rows)
  hashes = [
      hashlib.sha1(encoded).hexdigest()
      for encoded, _ in records.as_numpy_iterator()
  ]
  batches = ds.train_batches(config.batch_size, config.seed + 1)
  shapes = [list(next(batches)['image'].shape) for _ in range(steps)]
  with open(os.path.join(out_dir, f'shard{me}.json'), 'w') as f:
    json.dump(
        {
            'hashes': hashes,
            'shapes': shapes,
            'steps': steps,
            'num_train_examples': ds.num_train_examples,
        },
        f,
    )

  # 2-3. Training, uninterrupted and crashed-then-resumed.
  ref = train_lib.train(config, os.path.join(out_dir, 'ref'), dataset=ds)

  def crash_at_3(step):
    if step == 3:
      raise Crash()

  killed = os.path.join(out_dir, 'killed')
  try:
    train_lib.train(config, killed, dataset=ds, step_callback=crash_at_3)
  except Crash:
    pass
  else:
    raise AssertionError('the run did not crash')
  resumed = train_lib.train(config, killed, dataset=ds)
  if me == 0:
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
      json.dump({'ref': ref, 'resumed': resumed}, f)
  print(f'process {me} of {jax.process_count()} done')


if __name__ == '__main__':
  main(*sys.argv[1:])
