"""CIFAR ResNets that accept a gate PyTree.

Two families, as in GaterNet's Table 1:
- `CifarResNet` with basic blocks, depth 6n+2 (ResNet-20/32/44/56/110; He et
  al. 2016), post-activation, projection shortcuts where the shape changes
  (as the official GaterNet code);
- `CifarResNet` with pre-activation bottleneck blocks, depth 9n+2
  (ResNet-164; He et al., "Identity mappings"), whose first stage is
  16-4-16 as in the paper's footnote 2.

The gated site of every residual unit is its last conv's output, after that
conv's BN (basic blocks; pre-activation blocks have none there) and before
the residual add. The same site holds the squeeze-and-excitation unit of the
ResNet-SE baselines. With `num_classes=None` the network returns its pooled
features and serves as a gater's feature extractor.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.layers import SqueezeExcite, apply_site, batch_norm, conv

class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN-[gate]-(+shortcut)-ReLU."""
  features: int
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    y = conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    se = (SqueezeExcite(self.se_reduction, self.dtype, name='se')
          if self.se_reduction else None)
    y = apply_site(y, gate, se)
    shortcut = x
    if x.shape[-1] != self.features or self.stride != 1:
      shortcut = conv(self.features, 1, self.stride, self.dtype,
                       'shortcut_conv')(x)
      shortcut = batch_norm(train, self.dtype, 'shortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class PreActBottleneck(nn.Module):
  """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-[gate]-(+shortcut)."""
  features: Tuple[int, int]  # (bottleneck width, output width)
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    mid, out = self.features
    pre = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    y = conv(mid, 1, 1, self.dtype, 'conv1')(pre)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = conv(mid, 3, self.stride, self.dtype, 'conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn3')(y))
    y = conv(out, 1, 1, self.dtype, 'conv3')(y)
    se = (SqueezeExcite(self.se_reduction, self.dtype, name='se')
          if self.se_reduction else None)
    y = apply_site(y, gate, se)
    shortcut = x
    if x.shape[-1] != out or self.stride != 1:
      shortcut = conv(out, 1, self.stride, self.dtype, 'shortcut_conv')(pre)
    return y + shortcut


StageWidth = Union[int, Tuple[int, int]]


class CifarResNet(nn.Module):
  """A CIFAR ResNet of three stages (strides 1, 2, 2).

  Attributes:
    stage_sizes: residual units per stage.
    widths: per stage, the output width (basic) or `(bottleneck, output)`.
    block: 'basic' or 'preact_bottleneck'.
    stem_width: filters of the first 3x3 conv.
    num_classes: classifier outputs; None returns pooled features.
    se_reduction: >0 adds squeeze-and-excitation at each unit's site.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[StageWidth]
  block: str = 'basic'
  stem_width: int = 16
  num_classes: Optional[int] = 10
  se_reduction: int = 0
  dtype: Any = jnp.float32

  def gate_spec(self) -> GateSpec:
    """The gated sites, one per residual unit, in depth order."""
    sites = []
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      out = w[1] if isinstance(w, (tuple, list)) else w
      sites += [(f'stage{s + 1}_block{b + 1}', int(out)) for b in range(n)]
    return GateSpec(tuple(sites))

  @nn.compact
  def __call__(self, x: jax.Array, gates: Optional[Gates] = None, *,
               train: bool = False) -> jax.Array:
    """`(batch, h, w, c)` images (normalised) -> `(batch, num_classes)`."""
    assert self.block in ('basic', 'preact_bottleneck'), self.block
    x = x.astype(self.dtype)
    y = conv(self.stem_width, 3, 1, self.dtype, 'conv')(x)
    if self.block == 'basic':
      y = nn.relu(batch_norm(train, self.dtype, 'bn')(y))
      block_cls = BasicBlock
    else:
      block_cls = PreActBottleneck
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(n):
        name = f'stage{s + 1}_block{b + 1}'
        gate = None if gates is None else gates[name]
        stride = 2 if (s > 0 and b == 0) else 1
        y = block_cls(tuple(w) if isinstance(w, (tuple, list)) else w, stride,
                      self.se_reduction, self.dtype, name=name)(
                          y, gate, train=train)
    if self.block != 'basic':
      y = nn.relu(batch_norm(train, self.dtype, 'bn_final')(y))
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is None:
      return y.astype(jnp.float32)
    y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    return y.astype(jnp.float32)


def cifar_resnet(depth: int = 20, widths: Sequence[int] = (16, 32, 64),
                 stem_width: Optional[int] = None, **kwargs) -> CifarResNet:
  """Basic-block CIFAR ResNet of depth 6n+2."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'cifar_resnet depth must be 6n+2 (8, 20, 32, 44, 56, '
                     f'110, ...); got {depth}.')
  n = (depth - 2) // 6
  widths = tuple(int(w) for w in widths)
  return CifarResNet(stage_sizes=(n, n, n), widths=widths, block='basic',
                     stem_width=stem_width or widths[0], **kwargs)


def cifar_preact_resnet(
    depth: int = 164,
    widths: Sequence[Sequence[int]] = ((4, 16), (32, 128), (64, 256)),
    stem_width: int = 16, **kwargs) -> CifarResNet:
  """Pre-activation bottleneck CIFAR ResNet of depth 9n+2 (ResNet-164)."""
  if depth < 11 or (depth - 2) % 9:
    raise ValueError(f'cifar_preact_resnet depth must be 9n+2 (164 = 9*18+2);'
                     f' got {depth}.')
  n = (depth - 2) // 9
  widths = tuple(tuple(int(v) for v in w) for w in widths)
  return CifarResNet(stage_sizes=(n, n, n), widths=widths,
                     block='preact_bottleneck', stem_width=stem_width, **kwargs)


ResNet20 = functools.partial(cifar_resnet, depth=20)
ResNet56 = functools.partial(cifar_resnet, depth=56)
ResNet164 = functools.partial(cifar_preact_resnet, depth=164)
