"""Shake-Shake 26 for CIFAR (Gastaldi 2017) that accepts a gate PyTree.

A first conv3x3 to `stem_width` (16) channels + BN, then three stages of
(depth - 2) / 6 residual blocks of widths `width`, 2 * `width`, 4 * `width`
(strides 1, 2, 2), then ReLU-global pool-fc. Each block adds two branches
ReLU-conv3x3-BN-ReLU-conv3x3-BN (the first conv strided in a stage's first
block) to its shortcut, mixed by Shake-Shake-Image regularisation: in
training a per-sample alpha ~ U(0, 1) weighs the branches in the forward pass
and an independent per-sample beta ~ U(0, 1) in the backward pass; at
evaluation both weigh 0.5.

The shortcut is the identity, or where the shape changes (each stage's first
block, stage 1's included: 16 -> `width` channels) the paper's: the ReLU'd
input, subsampled at the stride by two 1x1 convs to half the width each, the
second over the input shifted by one pixel (so the two halves see the
complementary pixels of each 2x2 cell), concatenated, then BN. The shift is
up-left (pixel (i+1, j+1) lands at (i, j)), as in the widely used TensorFlow
(AutoAugment) port; Gastaldi's Torch code shifts down-right, which picks the
same odd pixels one cell earlier, with a zero first row and column. Either
way it changes no parameter count.

Parameter counts: with Gastaldi's 16-channel first conv, 2x64d / 2x96d have
11,653,978 / 26,192,922 parameters, Gastaldi's 11.7M / 26.2M; GaterNet's
Table 2 prints 11.71M / 26.33M. `stem_width=width` (the first conv straight to
the first stage's width, whose first block then has an identity shortcut)
gives 11,709,514 / 26,331,754, exactly Table 2's numbers (and, with the
ResNet-20 gater, its gated 12.01M / 26.65M), so that is most likely the
reimplementation GaterNet counted; the default stays Gastaldi's.

Gated sites (GaterNet section 4.4): the last conv of each branch, after its
BN and before the shake mix; 2 * 4 * 7 * `width` gated filters (3,584 for
2x64d, 5,376 for 2x96d).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.backbone import Extras, GateWire
from gaternet_jax.models.layers import apply_site, batch_norm, conv

NUM_STAGES = 3
NUM_BRANCHES = 2


@jax.custom_vjp
def shake(
    a: jax.Array, b: jax.Array, alpha: jax.Array, beta: jax.Array
) -> jax.Array:
  """alpha * a + (1 - alpha) * b, whose gradient mixes with beta instead.

  Args:
    a, b: `(batch, h, w, c)` branch outputs.
    alpha: `(batch, 1, 1, 1)` forward coefficients in [0, 1].
    beta: `(batch, 1, 1, 1)` backward coefficients in [0, 1]: the cotangent
      reaching `a` is `beta * g` and the one reaching `b` `(1 - beta) * g`.

  Returns:
    `(batch, h, w, c)`, the forward mix.
  """
  alpha = alpha.astype(a.dtype)
  return alpha * a + (1 - alpha) * b


def _shake_fwd(a, b, alpha, beta):
  return shake(a, b, alpha, beta), (alpha, beta)


def _shake_bwd(res, g):
  alpha, beta = res
  beta_g = beta.astype(g.dtype)
  # The coefficients are random draws, not learned: they get no gradient.
  return (
      beta_g * g,
      (1 - beta_g) * g,
      jnp.zeros_like(alpha),
      jnp.zeros_like(beta),
  )


shake.defvjp(_shake_fwd, _shake_bwd)


def _site_name(stage: int, block: int, branch: int) -> str:
  """1-based indices -> e.g. 'stage1_block1_branch1'."""
  return f'stage{stage}_block{block}_branch{branch}'


class Branch(nn.Module):
  """ReLU-conv3x3-BN-ReLU-conv3x3-BN-[gate]."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    y = nn.relu(x)
    y = conv(self.features, 3, self.stride, self.dtype, 'conv1')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    return apply_site(y, gate, None)


class ShakeShortcut(nn.Module):
  """ReLU, two strided 1x1 convs (one over a 1-pixel-shifted input), BN."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    assert self.features % 2 == 0, self.features
    x = nn.relu(x)
    s = self.stride
    # Shift up-left by one pixel, zero-filling the last row and column.
    shifted = jnp.pad(x[:, 1:, 1:, :], ((0, 0), (0, 1), (0, 1), (0, 0)))
    # A 1x1 conv at stride s is a 1x1 conv of the input subsampled at s.
    p1 = conv(self.features // 2, 1, 1, self.dtype, 'conv1')(x[:, ::s, ::s])
    p2 = conv(self.features // 2, 1, 1, self.dtype, 'conv2')(
        shifted[:, ::s, ::s]
    )
    y = jnp.concatenate([p1, p2], axis=-1)
    return batch_norm(train, self.dtype, 'bn')(y)


class ShakeBlock(nn.Module):
  """shortcut(x) + shake(branch1(x), branch2(x))."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, gate1, gate2, *, train: bool):
    a = Branch(self.features, self.stride, self.dtype, name='branch1')(
        x, gate1, train=train
    )
    b = Branch(self.features, self.stride, self.dtype, name='branch2')(
        x, gate2, train=train
    )
    if train:
      # Shake-Shake-Image: one alpha and one independent beta per sample.
      alpha_rng, beta_rng = jax.random.split(self.make_rng('dropout'))
      shape = (x.shape[0], 1, 1, 1)
      alpha = jax.random.uniform(alpha_rng, shape, jnp.float32)
      beta = jax.random.uniform(beta_rng, shape, jnp.float32)
      y = shake(a, b, alpha, beta)
    else:
      y = 0.5 * (a + b)
    if x.shape[-1] != self.features or self.stride != 1:
      shortcut = ShakeShortcut(
          self.features, self.stride, self.dtype, name='shortcut'
      )(x, train=train)
    else:
      shortcut = x
    return shortcut + y


class ShakeShake(nn.Module):
  """A CIFAR Shake-Shake network of three stages (strides 1, 2, 2).

  Attributes:
    blocks_per_stage: residual blocks per stage.
    width: the first stage's width ("2x64d": 64); the others double it.
    stem_width: filters of the first 3x3 conv.
    num_classes: classifier outputs; None returns pooled features.
  """

  supports_local_gating: ClassVar[bool] = False
  local_gating: ClassVar[None] = None

  blocks_per_stage: int
  width: int
  stem_width: int = 16
  num_classes: Optional[int] = 10
  dtype: Any = jnp.float32

  def _widths(self):
    return tuple(self.width * 2**s for s in range(NUM_STAGES))

  def gate_spec(self) -> GateSpec:
    """Two sites (the branches' last convs) per block, in depth order."""
    return GateSpec(
        tuple(
            (_site_name(s + 1, b + 1, r + 1), int(w))
            for s, w in enumerate(self._widths())
            for b in range(self.blocks_per_stage)
            for r in range(NUM_BRANCHES)
        )
    )

  def gate_wiring(self):
    """Per site, the convs its gates act on (for `gaternet_jax.macs`).

    A branch's gates multiply its `conv2` output after `bn2`, so a closed
    gate removes that output channel ('out'). Nothing reads the gated
    channel alone: it is mixed with the other branch and added to the
    shortcut, so no later conv loses an input.
    """
    out = {}
    for s in range(NUM_STAGES):
      for b in range(self.blocks_per_stage):
        for r in range(NUM_BRANCHES):
          out[_site_name(s + 1, b + 1, r + 1)] = (
              GateWire(
                  (f'stage{s + 1}_block{b + 1}', f'branch{r + 1}', 'conv2'),
                  'out',
              ),
          )
    return out

  @nn.compact
  def __call__(
      self, x: jax.Array, gates: Optional[Gates] = None, *, train: bool = False
  ) -> Tuple[jax.Array, Extras]:
    """`(batch, h, w, c)` images (normalised) -> (`(batch, num_classes)`
    logits, {}) (`backbone.py`'s contract).

    In training the shake coefficients come from the 'dropout' rng stream.
    """
    x = x.astype(self.dtype)
    y = conv(self.stem_width, 3, 1, self.dtype, 'conv')(x)
    y = batch_norm(train, self.dtype, 'bn')(y)
    for s, w in enumerate(self._widths()):
      for b in range(self.blocks_per_stage):
        g1 = g2 = None
        if gates is not None:
          g1 = gates[_site_name(s + 1, b + 1, 1)]
          g2 = gates[_site_name(s + 1, b + 1, 2)]
        stride = 2 if (s > 0 and b == 0) else 1
        y = ShakeBlock(
            w, stride, self.dtype, name=f'stage{s + 1}_block{b + 1}'
        )(y, g1, g2, train=train)
    y = nn.relu(y)
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is not None:
      y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    return y.astype(jnp.float32), {}


def shake_shake(
    depth: int = 26, width: int = 64, stem_width: int = 16, **kwargs
) -> ShakeShake:
  """Shake-Shake of depth 6n+2 (26: "2x64d", "2x96d" by `width`).

  `stem_width=16` is Gastaldi's; `stem_width=width` reproduces GaterNet's
  Table 2 parameter counts exactly (see the module docstring).
  """
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f'shake_shake depth must be 6n+2 (26 = 6*4+2); ' f'got {depth}.'
    )
  if width < 1 or width % 2:
    raise ValueError(
        f'shake_shake width must be even (the shortcut '
        f'concatenates two halves); got {width}.'
    )
  return ShakeShake(
      blocks_per_stage=(depth - 2) // 6,
      width=int(width),
      stem_width=int(stem_width),
      **kwargs,
  )
