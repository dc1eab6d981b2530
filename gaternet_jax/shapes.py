"""A small synthetic segmentation dataset: shapes on textured backgrounds.

The embedded default of the segmentation demo and tests (no download): each
`(size, size, 3)` uint8 image holds one to three shapes, discs, squares and
triangles at random places, sizes and rotations, painted in a flat colour
(plus noise) over a textured background (two random gratings and noise).
Each class draws its colour around its own mean, with ranges that overlap,
so colour hints at the class and the shape settles it. Masks
label background 0, disc 1, square 2, triangle 3, and `ignore_label` on
the anti-aliased rim of every shape (as VOC labels object borders), so
the ignore path of the loss and the metrics is exercised. Later shapes
occlude earlier ones.

`generate(n, size, seed)` is a pure function of its arguments.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

CLASS_NAMES = ('background', 'disc', 'square', 'triangle')
NUM_CLASSES = len(CLASS_NAMES)
# Shapes per image, and their radius as a fraction of the image side.
SHAPES_PER_IMAGE = (1, 2)
RADIUS_RANGE = (0.18, 0.32)
# Each class' mean fill colour (background: unused) and the uniform jitter
# around it: wide enough that colours of different classes overlap, so the
# colour hints at the class and the shape settles it.
CLASS_COLORS = np.array(
    [[0.5, 0.5, 0.5], [0.8, 0.3, 0.3], [0.3, 0.8, 0.3], [0.3, 0.3, 0.8]]
)
COLOR_JITTER = 0.3
# Seeds of the two splits (added to the config's seed).
TRAIN_SEED, TEST_SEED = 0, 1


def _texture(rng, yy, xx, size) -> np.ndarray:
  """`(size, size, 3)` float in [0, 1]: a colour modulated by two random
  gratings, plus noise."""
  color = rng.uniform(0.1, 0.9, 3)
  out = np.zeros((size, size, 3))
  for _ in range(2):
    freq = rng.uniform(1.0, 6.0) / size
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(
        2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase
    )
    out += wave[..., None] * rng.uniform(0.05, 0.2, 3)
  return np.clip(color + out + rng.normal(0, 0.04, out.shape), 0.0, 1.0)


def _signed_distance(kind: int, yy, xx, cy, cx, r, angle) -> np.ndarray:
  """Pixels' signed distance to the shape's edge, > 0 inside."""
  dy, dx = yy - cy, xx - cx
  c, s = np.cos(angle), np.sin(angle)
  u, v = c * dx + s * dy, -s * dx + c * dy
  if kind == 1:  # disc
    return r - np.hypot(u, v)
  if kind == 2:  # square of half-side 0.85 r, about the disc's area
    half = r * 0.85
    return half - np.maximum(np.abs(u), np.abs(v))
  # Equilateral triangle with circumradius r: inside all three half-planes.
  angles = [np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
  normals = [(np.cos(t), np.sin(t)) for t in angles]
  inradius = r / 2
  return np.min([inradius - (nu * u + nv * v) for nu, nv in normals], axis=0)


def generate(
    n: int, size: int, seed: int, ignore_label: int = 255
) -> Tuple[np.ndarray, np.ndarray]:
  """`n` images `(n, size, size, 3)` uint8 and masks `(n, size, size)`
  int32 (classes of CLASS_NAMES, `ignore_label` on shape rims)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  images = np.zeros((n, size, size, 3), np.uint8)
  masks = np.zeros((n, size, size), np.int32)
  for i in range(n):
    image = _texture(rng, yy, xx, size)
    mask = np.zeros((size, size), np.int32)
    for _ in range(rng.integers(SHAPES_PER_IMAGE[0], SHAPES_PER_IMAGE[1] + 1)):
      kind = int(rng.integers(1, NUM_CLASSES))
      r = rng.uniform(*RADIUS_RANGE) * size
      cy, cx = rng.uniform(0.15 * size, 0.85 * size, 2)
      sd = _signed_distance(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
      cover = np.clip(sd + 0.5, 0.0, 1.0)[..., None]  # anti-aliased edge
      color = CLASS_COLORS[kind] + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3)
      fill = np.clip(color + rng.normal(0, 0.04, image.shape), 0, 1)
      image = image * (1 - cover) + fill * cover
      mask[sd >= 0.5] = kind
      mask[np.abs(sd) < 0.5] = ignore_label
    images[i] = np.round(image * 255).astype(np.uint8)
    masks[i] = mask
  return images, masks
