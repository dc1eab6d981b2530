"""Small configs, synthetic datasets and states shared by the tests."""

import ml_collections
import numpy as np

from configs import base
from gaternet_jax.data import InMemoryDataset, train_augmentation


def tiny_config(gated: bool = True) -> ml_collections.ConfigDict:
  """A ResNet-8 of widths 4/8/16 on 16x16 images: compiles in seconds."""
  c = base.base_config()
  c.data.name = 'synthetic'
  c.data.crop_padding, c.data.flip = 2, True
  arch = dict(name='cifar_resnet', depth=8, widths=(4, 8, 16))
  c.model.backbone = ml_collections.ConfigDict(dict(arch, se_reduction=0))
  c.model.gater = ml_collections.ConfigDict(
      dict(arch, bottleneck=4, batchnorm=True)
  )
  c.model.gating = 'gater' if gated else 'none'
  c.batch_size = 16
  c.eval_batch_size = 24
  c.num_epochs = 1
  c.num_train_steps = 6
  c.optimizer.lr_boundaries = (0.5,)
  c.log_every_steps = 2
  c.eval_every_epochs = 100.0
  c.checkpoint_every_steps = 2
  c.progress_every_secs = 1000.0
  c.tensorboard = False
  c.pretrain.enabled = False
  return c


def tiny_local_config(l0: bool = True) -> ml_collections.ConfigDict:
  """`tiny_config`'s ResNet-8 with batch-shaping's self-gating units."""
  c = tiny_config(gated=False)
  c.model.gating = 'local'
  c.model.local_gating = ml_collections.ConfigDict(
      dict(position='conv1', hidden=4, temperature=2.0 / 3.0, bias_init=1.0)
  )
  c.gate_l1_weight = 0.0
  c.batch_shaping.update(
      dict(
          weight=1.0,
          final_weight=0.5,
          decay_start_epoch=1.0,
          decay_end_epoch=2.0,
      )
  )
  c.l0.update(dict(weight=0.1 if l0 else 0.0, start_epoch=0.0, ramp_epochs=1.0))
  return c


def synthetic_dataset(
    n_train: int = 64,
    n_test: int = 40,
    size: int = 16,
    num_classes: int = 3,
    seed: int = 0,
) -> InMemoryDataset:
  """Images whose class sets their brightness: learnable in a few steps."""
  rng = np.random.default_rng(seed)

  def make(n):
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    base_level = (labels * (200 // max(num_classes - 1, 1)))[
        :, None, None, None
    ]
    images = np.clip(
        base_level + rng.integers(0, 50, (n, size, size, 3)), 0, 255
    ).astype(np.uint8)
    return images, labels

  tr, te = make(n_train), make(n_test)
  return InMemoryDataset(
      name='synthetic',
      train_images=tr[0],
      train_labels=tr[1],
      test_images=te[0],
      test_labels=te[1],
      num_classes=num_classes,
      mean=(0.5, 0.5, 0.5),
      std=(0.3, 0.3, 0.3),
      test_split_name='test',
      # The pad-crop and flip that tiny_config's data asks for.
      augmentation=train_augmentation(tiny_config().data),
  )


def dense_train_state(step: int = 0, width: int = 64):
  """A Dense(width) layer's flax TrainState (SGD) on 64 inputs, at `step`,
  with random parameters that are a function of `step` (so that their
  checkpoint's array files do not compress to a few bytes)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  model = nn.Dense(width)
  params = model.init(jax.random.key(0), jnp.ones((1, 64)))['params']
  params = jax.tree_util.tree_map(
      lambda x: jax.random.normal(jax.random.key(step), x.shape), params
  )
  return train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(0.1)
  ).replace(step=jnp.int32(step))
