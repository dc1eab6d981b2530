"""ImageNet ResNets that accept a gate PyTree (GaterNet's Table 3 backbones).

He et al. 2016 in torchvision's layout: a 7x7/2 stem conv + BN + ReLU and a
3x3/2 max-pool, then four stages (strides 1, 2, 2, 2) of
- basic blocks (ResNet-18/34), or
- bottleneck blocks of expansion 4 (ResNet-50/101/152) that stride on their
  3x3 conv (torchvision's "v1.5"; the original paper strides the first 1x1),
with projection shortcuts (1x1 conv + BN) wherever the shape changes, a global
average pool and a fully-connected classifier. With 1000 classes and BN's
scale/offset counted, ResNet-18/34/50/101/152 hold 11.69M/21.80M/25.56M/
44.55M/60.19M parameters, torchvision's counts and Table 3's.

The gated site of every residual unit is its last conv's output, after that
conv's BN and before the residual add (section 4.4: "the last convolutional
layer in each residual unit, which is similar to the SE-block"); it also holds
the squeeze-and-excitation unit of the ResNet-SE baselines. With
`num_classes=None` the network returns its pooled features (ResNet-18 is
GaterNet's ImageNet gater).

ResNet-Wider ("additional filters at each layer") multiplies every width,
the stem's included, by one factor; configs/imagenet.py holds the integer widths
that match Table 3's parameter counts. ResNet-SE uses Hu et al.'s reduction
16, which reproduces Table 3's counts exactly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.layers import (LocalGating, SqueezeExcite, apply_site,
                                       batch_norm, conv, gate_channels,
                                       parse_local_gating,
                                       residual_gate_wiring)

# Bottleneck blocks output `EXPANSION * width` channels.
EXPANSION = 4

# depth -> (block, residual units per stage).
DEPTHS = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}

STANDARD_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN-[SE][gate]-(+shortcut)-ReLU.

  Attributes:
    features: output channels of both convs (the gated site's size).
    stride: of the first conv and of the projection shortcut.
    se_reduction: >0 adds squeeze-and-excitation at the gated site.
    local_gating: batch-shaping's gating module, gating conv1's channels
      (the unit then returns `(y, gate sample)`), or None.
  """
  features: int
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  @nn.compact
  def __call__(self, x: jax.Array, gate: Optional[jax.Array], *,
               train: bool):
    """`(batch, h, w, c)` -> `(batch, h / stride, w / stride, features)`."""
    sample = (None if self.local_gating is None else
              self.local_gating.module(self.features, self.dtype)(
                  x, train=train))
    y = conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    if sample is not None:
      y = gate_channels(y, sample['gate'])
    y = conv(self.features, 3, 1, self.dtype, 'conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(y)
    se = (SqueezeExcite(self.se_reduction, self.dtype, name='se')
          if self.se_reduction else None)
    y = apply_site(y, gate, se)
    y = nn.relu(y + _shortcut(x, self.features, self.stride, train,
                              self.dtype))
    return y if sample is None else (y, sample)


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU-conv3x3/s-BN-ReLU-conv1x1-BN-[SE][gate]-(+shortcut)-ReLU.

  Attributes:
    width: channels of the two inner convs; the block outputs
      `EXPANSION * width` (the gated site's size).
    stride: of the 3x3 conv (torchvision v1.5) and of the projection.
    se_reduction: >0 adds squeeze-and-excitation at the gated site.
    local_gating: batch-shaping's gating module, gating the inner channels
      after conv1 or conv2 (the unit then returns `(y, gate sample)`), or
      None.
  """
  width: int
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  @nn.compact
  def __call__(self, x: jax.Array, gate: Optional[jax.Array], *,
               train: bool):
    """`(batch, h, w, c)` -> `(batch, h / stride, w / stride, 4 * width)`."""
    out = EXPANSION * self.width
    sample, position = None, ''
    if self.local_gating is not None:
      sample = self.local_gating.module(self.width, self.dtype)(x, train=train)
      position = self.local_gating.position
    y = conv(self.width, 1, 1, self.dtype, 'conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    if position == 'conv1':
      y = gate_channels(y, sample['gate'])
    y = conv(self.width, 3, self.stride, self.dtype, 'conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    if position == 'conv2':
      y = gate_channels(y, sample['gate'])
    y = conv(out, 1, 1, self.dtype, 'conv3')(y)
    y = batch_norm(train, self.dtype, 'bn3')(y)
    se = (SqueezeExcite(self.se_reduction, self.dtype, name='se')
          if self.se_reduction else None)
    y = apply_site(y, gate, se)
    y = nn.relu(y + _shortcut(x, out, self.stride, train, self.dtype))
    return y if sample is None else (y, sample)


def _shortcut(x: jax.Array, features: int, stride: int, train: bool,
              dtype) -> jax.Array:
  """Identity, or conv1x1/stride + BN where the shape changes (option B).

  Called inside a block's compact `__call__`, so the layers it creates are
  that block's children ('shortcut_conv', 'shortcut_bn').
  """
  if x.shape[-1] == features and stride == 1:
    return x
  x = conv(features, 1, stride, dtype, 'shortcut_conv')(x)
  return batch_norm(train, dtype, 'shortcut_bn')(x)


class ImageNetResNet(nn.Module):
  """An ImageNet ResNet of four stages (strides 1, 2, 2, 2).

  Attributes:
    stage_sizes: residual units per stage.
    widths: per stage, the basic block's width or the bottleneck's inner
      width (its output is `EXPANSION` times that).
    block: 'basic' or 'bottleneck'.
    stem_width: filters of the 7x7 stem conv; None means `widths[0]`.
    num_classes: classifier outputs; None returns pooled features.
    se_reduction: >0 adds squeeze-and-excitation at each unit's site.
    local_gating: None (gates, if any, come from a gater and act at each
      unit's last conv) or batch-shaping's channel gating inside each unit.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[int] = STANDARD_WIDTHS
  block: str = 'bottleneck'
  stem_width: Optional[int] = None
  num_classes: Optional[int] = 1000
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  def gate_spec(self) -> GateSpec:
    """The gated sites, one per residual unit, in depth order: the unit's
    output channels, or with local gating its gated inner channels."""
    mult = (EXPANSION if self.block == 'bottleneck' and
            self.local_gating is None else 1)
    return GateSpec(tuple(
        (f'stage{s + 1}_block{b + 1}', int(mult * w))
        for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths))
        for b in range(n)))

  def gate_wiring(self):
    """Per site, the convs whose output channels its gates switch off and
    those that read them: `{site: ((conv path, 'out'|'in', offset), ...)}`."""
    return residual_gate_wiring(self.gate_spec().names, self.block,
                                self.local_gating)

  @nn.compact
  def __call__(self, x: jax.Array, gates: Optional[Gates] = None, *,
               train: bool = False) -> jax.Array:
    """`(batch, h, w, 3)` normalised images -> `(batch, num_classes)` float32.

    Args:
      x: images; 224x224 gives the usual 7x7 final feature map, but any size
        of at least 32x32 runs (the stem and stages divide it by 32).
      gates: None, or `{site: (batch, filters)}` for every site of
        `gate_spec()`; each site's channels are multiplied by its gates.
      train: BN uses batch statistics (and updates 'batch_stats') if True.

    Returns:
      Logits, or `(batch, C)` pooled features when `num_classes` is None;
      with local gating, `(that, {site: gate sample})`.
    """
    if self.block not in ('basic', 'bottleneck'):
      raise ValueError(f"block must be 'basic' or 'bottleneck'; got "
                       f'{self.block!r}.')
    if self.local_gating is not None:
      assert gates is None, 'a locally gated network makes its own gates'
      if self.block == 'basic' and self.local_gating.position != 'conv1':
        raise ValueError("basic blocks gate at local_gating.position 'conv1'"
                         f'; got {self.local_gating.position!r}.')
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f'stage_sizes {tuple(self.stage_sizes)} and widths '
                       f'{tuple(self.widths)} differ in length.')
    x = x.astype(self.dtype)
    stem = self.stem_width or self.widths[0]
    y = conv(stem, 7, 2, self.dtype, 'conv')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn')(y))
    # torchvision's MaxPool2d(3, 2, padding=1); flax pads with -inf, so the
    # padding never wins the max.
    y = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    samples = {}
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for b in range(n):
        name = f'stage{s + 1}_block{b + 1}'
        gate = None if gates is None else gates[name]
        stride = 2 if (s > 0 and b == 0) else 1
        if self.block == 'basic':
          unit = BasicBlock(int(w), stride, self.se_reduction, self.dtype,
                            self.local_gating, name=name)
        else:
          unit = Bottleneck(int(w), stride, self.se_reduction, self.dtype,
                            self.local_gating, name=name)
        y = unit(y, gate, train=train)
        if self.local_gating is not None:
          y, samples[name] = y
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is not None:
      y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    y = y.astype(jnp.float32)
    return y if self.local_gating is None else (y, samples)


def imagenet_resnet(depth: int = 50,
                    widths: Sequence[int] = STANDARD_WIDTHS,
                    se_reduction: int = 0,
                    num_classes: Optional[int] = 1000,
                    dtype: Any = jnp.float32,
                    stem_width: Optional[int] = None,
                    local_gating: Any = None) -> ImageNetResNet:
  """ImageNet ResNet-{18, 34, 50, 101, 152}.

  Args:
    depth: 18 or 34 (basic blocks) or 50, 101, 152 (bottlenecks).
    widths: the four stages' widths (bottleneck: inner width, output 4x);
      configs/imagenet.py's WIDER gives Table 3's ResNet-Wider.
    se_reduction: >0 (Table 3's ResNet-SE: 16) adds
      squeeze-and-excitation units.
    num_classes: classifier outputs; None gives a feature extractor.
    dtype: compute dtype; parameters stay float32.
    stem_width: the stem conv's filters; None follows `widths[0]` (64 for
      the standard widths), so a uniformly widened net widens its stem too.
    local_gating: a `LocalGating` or its fields as a dict (batch-shaping's
      channel-gated units), or None.

  Returns:
    The (unbound) module.
  """
  if depth not in DEPTHS:
    raise ValueError(f'imagenet_resnet depth must be one of '
                     f'{sorted(DEPTHS)}; got {depth}.')
  widths = tuple(int(w) for w in widths)
  if len(widths) != 4:
    raise ValueError(f'imagenet_resnet needs 4 stage widths; got {widths}.')
  block, stage_sizes = DEPTHS[depth]
  return ImageNetResNet(stage_sizes=stage_sizes, widths=widths, block=block,
                        stem_width=stem_width, num_classes=num_classes,
                        se_reduction=se_reduction, dtype=dtype,
                        local_gating=parse_local_gating(local_gating))
