"""DenseNet-BC for CIFAR (Huang et al., CVPR 2017) that accepts a gate PyTree.

Three dense blocks of n = (depth - 4) / 6 bottleneck layers each
(BN-ReLU-conv1x1 to 4k, BN-ReLU-conv3x3 to k, the k new maps concatenated to
the block's input), a first 3x3 conv to 2k channels, transitions
BN-ReLU-conv1x1 (compression 0.5) + 2x2 average pooling, and a final
BN-ReLU-global pool-fc. Depth 100 / 250 / 190 with k = 12 / 24 / 40 are the
0.77M / 15.3M / 25.6M models of GaterNet's Table 2.

Gated sites (GaterNet section 4.4, "all the convolutional layers except the
first in each dense block"): the k new feature maps of every dense layer but
the first of each block, gated before they are concatenated, so a closed gate
removes that map from every later layer's input. The paper's gated-filter
counts pin this reading down: 3 * (n - 1) * k = 540 / 2,880 / 3,600.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.layers import apply_site, batch_norm, conv

NUM_BLOCKS = 3


def _site_name(block: int, layer: int) -> str:
  """1-based block and layer -> e.g. 'block1_layer02'."""
  return f'block{block}_layer{layer:02d}'


class DenseLayer(nn.Module):
  """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k)-[gate]; returns the k new maps."""
  growth_rate: int
  bottleneck_width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    y = conv(self.bottleneck_width, 1, 1, self.dtype, 'conv1')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = conv(self.growth_rate, 3, 1, self.dtype, 'conv2')(y)
    return apply_site(y, gate, None)


class Transition(nn.Module):
  """BN-ReLU-conv1x1(compressed width)-avgpool 2x2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.relu(batch_norm(train, self.dtype, 'bn')(x))
    y = conv(self.features, 1, 1, self.dtype, 'conv')(y)
    return nn.avg_pool(y, (2, 2), strides=(2, 2))


class DenseNetBC(nn.Module):
  """DenseNet-BC of three dense blocks for 32x32 inputs.

  Attributes:
    layers_per_block: n bottleneck layers per dense block.
    growth_rate: k, the new feature maps each dense layer adds.
    compression: theta, the transitions' width reduction.
    bottleneck_factor: the 1x1 conv's width is `bottleneck_factor * k`.
    num_classes: classifier outputs; None returns pooled features.
  """
  layers_per_block: int
  growth_rate: int
  compression: float = 0.5
  bottleneck_factor: int = 4
  num_classes: Optional[int] = 10
  dtype: Any = jnp.float32

  def gate_spec(self) -> GateSpec:
    """The k new maps of each dense layer but each block's first."""
    return GateSpec(tuple(
        (_site_name(b + 1, l + 1), int(self.growth_rate))
        for b in range(NUM_BLOCKS) for l in range(1, self.layers_per_block)))

  @nn.compact
  def __call__(self, x: jax.Array, gates: Optional[Gates] = None, *,
               train: bool = False) -> jax.Array:
    """`(batch, h, w, c)` images (normalised) -> `(batch, num_classes)`.

    `gates`, when given, maps each site of `gate_spec()` to `(batch, k)`.
    """
    k = self.growth_rate
    x = x.astype(self.dtype)
    y = conv(2 * k, 3, 1, self.dtype, 'conv')(x)
    for b in range(NUM_BLOCKS):
      for l in range(self.layers_per_block):
        name = _site_name(b + 1, l + 1)
        # The first layer of a block is not a gated site (section 4.4).
        gate = None if (gates is None or l == 0) else gates[name]
        new = DenseLayer(k, self.bottleneck_factor * k, self.dtype,
                         name=name)(y, gate, train=train)
        y = jnp.concatenate([y, new], axis=-1)
      if b < NUM_BLOCKS - 1:
        # floor, as the reference implementations' int(theta * c).
        y = Transition(int(self.compression * y.shape[-1]), self.dtype,
                       name=f'transition{b + 1}')(y, train=train)
    y = nn.relu(batch_norm(train, self.dtype, 'bn_final')(y))
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is None:
      return y.astype(jnp.float32)
    y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    return y.astype(jnp.float32)


def densenet_bc(depth: int = 100, growth_rate: int = 12,
                compression: float = 0.5, **kwargs) -> DenseNetBC:
  """DenseNet-BC of depth 6n+4 (100, 190, 250) and growth rate k."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f'densenet_bc depth must be 6n+4 (100, 190, 250, ...); '
                     f'got {depth}.')
  if not 0.0 < compression <= 1.0:
    raise ValueError(f'densenet_bc compression must be in (0, 1]; '
                     f'got {compression}.')
  return DenseNetBC(layers_per_block=(depth - 4) // 6,
                    growth_rate=int(growth_rate),
                    compression=float(compression), **kwargs)


DenseNetBC100 = functools.partial(densenet_bc, depth=100, growth_rate=12)
DenseNetBC250 = functools.partial(densenet_bc, depth=250, growth_rate=24)
DenseNetBC190 = functools.partial(densenet_bc, depth=190, growth_rate=40)
