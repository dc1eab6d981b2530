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

from typing import Any, ClassVar, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.backbone import Extras, GateWire
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

  supports_local_gating: ClassVar[bool] = False
  local_gating: ClassVar[None] = None

  layers_per_block: int
  growth_rate: int
  compression: float = 0.5
  bottleneck_factor: int = 4
  num_classes: Optional[int] = 10
  dtype: Any = jnp.float32

  def gate_spec(self) -> GateSpec:
    """The k new maps of each dense layer but each block's first."""
    return GateSpec(
        tuple(
            (_site_name(b + 1, l + 1), int(self.growth_rate))
            for b in range(NUM_BLOCKS)
            for l in range(1, self.layers_per_block)
        )
    )

  def gate_wiring(self):
    """Per site, the convs its gates act on (for `gaternet_jax.macs`):
    `{site: (GateWire, ...)}`.

    A site's gates multiply its layer's `conv2` output right after the conv,
    so a closed gate removes that output channel ('out'). The gated map is
    then concatenated to the block's running input, at offset
    `c_b + l * k` (`c_b` the block's input width, `l` the 0-based layer), and
    every later reader sees it through BN-ReLU: each later dense layer's
    `conv1`, then the transition's `conv` (blocks 1-2) or, after the last
    block, `bn_final`-ReLU-global pool and `fc`. These are declared 'in'.

    Strictly, a closed channel is not zero at those readers' inputs: at
    inference it is relu(BN(0)) = relu(beta - gamma * mean / sqrt(var +
    eps)), a per-channel constant that depends on no pixel and no image.
    Every reader is a 1x1 conv (no padding) or the fc after global pooling,
    so such a channel adds the same constant to every position of each
    reader output, which folds into a bias computed once per sample in
    (closed channels x reader outputs) MACs with no spatial factor; the
    reader's work on that input slice is skipped, and that small bias cost
    is not counted. (In training BN uses batch statistics; MACs concern
    inference.) A layer whose k gates are all closed could also skip its
    `conv1` and `bn2`; that is not declared (counted dense).
    """
    k = int(self.growth_rate)
    n = int(self.layers_per_block)
    out = {}
    width = 2 * k  # the first conv's output: block 1's input
    for b in range(NUM_BLOCKS):
      for l in range(1, n):
        offset = width + l * k
        entries = [GateWire((_site_name(b + 1, l + 1), 'conv2'), 'out')]
        entries += [
            GateWire((_site_name(b + 1, j + 1), 'conv1'), 'in', offset)
            for j in range(l + 1, n)
        ]
        if b < NUM_BLOCKS - 1:
          entries.append(GateWire((f'transition{b + 1}', 'conv'), 'in', offset))
        elif self.num_classes is not None:
          entries.append(GateWire(('fc',), 'in', offset))
        out[_site_name(b + 1, l + 1)] = tuple(entries)
      width = int(self.compression * (width + n * k))
    return out

  @nn.compact
  def __call__(
      self, x: jax.Array, gates: Optional[Gates] = None, *, train: bool = False
  ) -> Tuple[jax.Array, Extras]:
    """`(batch, h, w, c)` images (normalised) -> (`(batch, num_classes)`
    logits, {}) (`backbone.py`'s contract).

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
        new = DenseLayer(k, self.bottleneck_factor * k, self.dtype, name=name)(
            y, gate, train=train
        )
        y = jnp.concatenate([y, new], axis=-1)
      if b < NUM_BLOCKS - 1:
        # floor, as the reference implementations' int(theta * c).
        y = Transition(
            int(self.compression * y.shape[-1]),
            self.dtype,
            name=f'transition{b + 1}',
        )(y, train=train)
    y = nn.relu(batch_norm(train, self.dtype, 'bn_final')(y))
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is not None:
      y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    return y.astype(jnp.float32), {}


def densenet_bc(
    depth: int = 100, growth_rate: int = 12, compression: float = 0.5, **kwargs
) -> DenseNetBC:
  """DenseNet-BC of depth 6n+4 (100, 190, 250) and growth rate k."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f'densenet_bc depth must be 6n+4 (100, 190, 250, ...); ' f'got {depth}.'
    )
  if not 0.0 < compression <= 1.0:
    raise ValueError(
        f'densenet_bc compression must be in (0, 1]; ' f'got {compression}.'
    )
  return DenseNetBC(
      layers_per_block=(depth - 4) // 6,
      growth_rate=int(growth_rate),
      compression=float(compression),
      **kwargs,
  )
