"""Image preprocessing in JAX, inside the jitted step.

uint8 images in, normalised float32 out; training adds the standard CIFAR
augmentation (zero-pad and random crop, random horizontal flip), drawn per
sample from an explicit key.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The augmentation the train step applies on the device.

  A dataset says which it needs (`Dataset.augmentation`): in-memory ones
  (digits, CIFAR) the pad-crop and flip of their config, streamed ones none,
  because their tf.data pipeline crops and flips already.

  Attributes:
    crop_padding: zero-padding on each side before the random crop back to
      the image's size; 0 for no crop.
    flip: random horizontal flips.
  """

  crop_padding: int = 0
  flip: bool = False


# What a dataset that augments its own batches (or needs none) asks for.
NO_AUGMENTATION = Augmentation()


def random_crop(images: jax.Array, rng: jax.Array, padding: int) -> jax.Array:
  """Pads `(batch, h, w, c)` with zeros by `padding` and crops back per sample."""
  if padding <= 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(
      images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
  )
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
  """Mirrors each `(h, w, c)` image left-right with probability 1/2."""
  flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def preprocess(
    images: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool = False,
    rng: jax.Array | None = None,
    crop_padding: int = 0,
    flip: bool = False,
) -> jax.Array:
  """`(batch, h, w, c)` uint8 -> normalised float32, augmented if `train`."""
  x = images.astype(jnp.float32) / 255.0
  if train and (crop_padding > 0 or flip):
    assert rng is not None, 'training augmentation needs an rng'
    crop_rng, flip_rng = jax.random.split(rng)
    x = random_crop(x, crop_rng, crop_padding)
    if flip:
      x = random_flip(x, flip_rng)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std
