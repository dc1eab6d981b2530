"""Image preprocessing in JAX, inside the jitted step.

uint8 images in, normalised float32 out; training adds the standard CIFAR
augmentation (zero-pad and random crop, random horizontal flip), drawn per
sample from an explicit key.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

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
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@dataclasses.dataclass(frozen=True)
class SegmentationAugmentation:
  """The joint augmentation of a segmentation train step: image and mask
  rescaled, cropped and flipped by the same draw.

  Attributes:
    crop_size: `(height, width)` of the crops the step trains on.
    scale_range: `(low, high)` of the random rescale factor, drawn
      uniformly per image; (1, 1) for none.
    flip: random horizontal flips.
    ignore_label: the mask value of pixels that fall outside the rescaled
      image (and that the loss skips).
  """

  crop_size: Tuple[int, int]
  scale_range: Tuple[float, float] = (1.0, 1.0)
  flip: bool = False
  ignore_label: int = 255


def _bilinear(image: jax.Array, ys: jax.Array, xs: jax.Array) -> jax.Array:
  """`(h, w, c)` sampled at rows `ys` `(H,)` x columns `xs` `(W,)` (pixel
  centres at integers); 0 outside the image."""
  h, w, _ = image.shape
  y0, x0 = jnp.floor(ys), jnp.floor(xs)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)

  def tap(yi, xi):
    inside = ((yi >= 0) & (yi < h))[:, None] & ((xi >= 0) & (xi < w))[None, :]
    v = image[jnp.clip(yi, 0, h - 1)[:, None], jnp.clip(xi, 0, w - 1)[None, :]]
    return jnp.where(inside[..., None], v, 0.0)

  top = tap(y0, x0) * (1 - wx) + tap(y0, x0 + 1) * wx
  bottom = tap(y0 + 1, x0) * (1 - wx) + tap(y0 + 1, x0 + 1) * wx
  return top * (1 - wy) + bottom * wy


def _nearest(mask: jax.Array, ys: jax.Array, xs: jax.Array, fill: int):
  """`(h, w)` labels at the nearest pixel of rows `ys` x columns `xs`;
  `fill` outside the mask."""
  h, w = mask.shape
  yi = jnp.floor(ys + 0.5).astype(jnp.int32)
  xi = jnp.floor(xs + 0.5).astype(jnp.int32)
  inside = ((yi >= 0) & (yi < h))[:, None] & ((xi >= 0) & (xi < w))[None, :]
  v = mask[jnp.clip(yi, 0, h - 1)[:, None], jnp.clip(xi, 0, w - 1)[None, :]]
  return jnp.where(inside, v, fill)


def sampling_grid(
    rng: jax.Array, image_hw: Tuple[int, int], aug: SegmentationAugmentation
) -> Tuple[jax.Array, jax.Array]:
  """Source coordinates `(crop_h,)` and `(crop_w,)` of one random rescale,
  crop and flip of an `image_hw` image.

  The image is rescaled by s ~ U(scale_range); a crop_size window is placed
  uniformly inside it (or, where the rescaled image is smaller, the image
  uniformly inside the window, the rest padded); a flip reverses the
  columns. Output pixel i reads source coordinate (i + 0.5 + offset) / s -
  0.5, so image and mask read the same places.
  """
  scale_rng, y_rng, x_rng, flip_rng = jax.random.split(rng, 4)
  lo, hi = aug.scale_range
  s = jax.random.uniform(scale_rng, (), jnp.float32, lo, hi)
  coords = []
  for key, size, crop in (
      (y_rng, image_hw[0], aug.crop_size[0]),
      (x_rng, image_hw[1], aug.crop_size[1]),
  ):
    slack = s * size - crop  # < 0: the window is larger than the image.
    offset = jax.random.uniform(key, (), jnp.float32) * slack
    offset = jnp.where(slack >= 0, jnp.floor(offset), offset)
    centres = jnp.arange(crop, dtype=jnp.float32) + 0.5 + offset
    coords.append(centres / s - 0.5)
  ys, xs = coords
  if aug.flip:
    xs = jnp.where(jax.random.bernoulli(flip_rng), xs[::-1], xs)
  return ys, xs


def joint_augment(
    images: jax.Array,
    labels: jax.Array,
    rng: jax.Array,
    aug: SegmentationAugmentation,
) -> Tuple[jax.Array, jax.Array]:
  """Rescales, crops and flips `(batch, h, w, c)` float images (bilinear,
  0 outside) and their `(batch, h, w)` int masks (nearest, `ignore_label`
  outside) together, one draw per image; returns `(batch, crop_h, crop_w,
  c)` and `(batch, crop_h, crop_w)`."""
  hw = (images.shape[1], images.shape[2])

  def one(image, mask, key):
    ys, xs = sampling_grid(key, hw, aug)
    return _bilinear(image, ys, xs), _nearest(mask, ys, xs, aug.ignore_label)

  keys = jax.random.split(rng, images.shape[0])
  return jax.vmap(one)(images, labels, keys)


def preprocess_pair(
    images: jax.Array,
    labels: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    rng: jax.Array,
    aug: SegmentationAugmentation,
) -> Tuple[jax.Array, jax.Array]:
  """A segmentation train batch: `(batch, h, w, c)` uint8 images and
  `(batch, h, w)` masks -> normalised, jointly augmented crops. Padding
  is 0 after normalisation (the mean colour)."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return joint_augment(x, labels.astype(jnp.int32), rng, aug)
