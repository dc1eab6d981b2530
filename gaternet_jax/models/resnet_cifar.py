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

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.layers import (LocalGating, SqueezeExcite, apply_site,
                                       batch_norm, conv, gate_channels,
                                       parse_local_gating,
                                       residual_gate_wiring)


def _local_gate(module: nn.Module, x: jax.Array, features: int, train: bool):
  """The unit's own gate sample (batch-shaping), or None."""
  if module.local_gating is None:
    return None
  return module.local_gating.module(features, module.dtype)(x, train=train)


def _gate_at(y, sample, position: str, here: str):
  return y if sample is None or position != here else gate_channels(
      y, sample['gate'])


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-[local gate]-conv3x3-BN-[gate]-(+shortcut)-ReLU.

  With `local_gating`, a gating module reading the unit's input gates
  conv1's channels and the unit returns `(y, gate sample)`.
  """
  features: int
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    sample = _local_gate(self, x, self.features, train)
    y = conv(self.features, 3, self.stride, self.dtype, 'conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = _gate_at(y, sample, 'conv1', 'conv1')
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
    y = nn.relu(y + shortcut)
    return y if sample is None else (y, sample)


class PreActBottleneck(nn.Module):
  """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-[gate]-(+shortcut).

  With `local_gating`, a gating module reading the unit's input gates the
  channels after conv1 or conv2 (`local_gating.position`) and the unit
  returns `(y, gate sample)`.
  """
  features: Tuple[int, int]  # (bottleneck width, output width)
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    mid, out = self.features
    sample = _local_gate(self, x, mid, train)
    position = self.local_gating.position if sample is not None else ''
    pre = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    y = conv(mid, 1, 1, self.dtype, 'conv1')(pre)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    y = _gate_at(y, sample, position, 'conv1')
    y = conv(mid, 3, self.stride, self.dtype, 'conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn3')(y))
    y = _gate_at(y, sample, position, 'conv2')
    y = conv(out, 1, 1, self.dtype, 'conv3')(y)
    se = (SqueezeExcite(self.se_reduction, self.dtype, name='se')
          if self.se_reduction else None)
    y = apply_site(y, gate, se)
    shortcut = x
    if x.shape[-1] != out or self.stride != 1:
      shortcut = conv(out, 1, self.stride, self.dtype, 'shortcut_conv')(pre)
    y = y + shortcut
    return y if sample is None else (y, sample)


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
    local_gating: None (gates, if any, come from a gater and act at each
      unit's last conv) or batch-shaping's channel gating inside each unit.
  """
  stage_sizes: Sequence[int]
  widths: Sequence[StageWidth]
  block: str = 'basic'
  stem_width: int = 16
  num_classes: Optional[int] = 10
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None

  def _units(self):
    """(site name, inner width, output width) of every unit in depth order."""
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      inner, out = (w if isinstance(w, (tuple, list)) else (w, w))
      for b in range(n):
        yield f'stage{s + 1}_block{b + 1}', int(inner), int(out)

  def gate_spec(self) -> GateSpec:
    """The gated sites, one per residual unit, in depth order: the unit's
    output channels, or with local gating its gated inner channels."""
    inner = self.local_gating is not None
    return GateSpec(tuple((name, i if inner else o)
                          for name, i, o in self._units()))

  def gate_wiring(self):
    """Per site, the convs whose output channels its gates switch off and
    those that read them: `{site: ((conv path, 'out'|'in', offset), ...)}`."""
    units = [name for name, _, _ in self._units()]
    return residual_gate_wiring(units, self.block, self.local_gating)

  @nn.compact
  def __call__(self, x: jax.Array, gates: Optional[Gates] = None, *,
               train: bool = False):
    """`(batch, h, w, c)` images (normalised) -> `(batch, num_classes)`.

    With local gating, returns `(logits, {site: gate sample})` instead; each
    sample holds the unit's 'gate', 'value' and 'prob' arrays.
    """
    assert self.block in ('basic', 'preact_bottleneck'), self.block
    if self.local_gating is not None:
      assert gates is None, 'a locally gated network makes its own gates'
      if self.block == 'basic' and self.local_gating.position != 'conv1':
        raise ValueError("basic blocks gate at local_gating.position 'conv1'"
                         f'; got {self.local_gating.position!r}.')
    samples = {}
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
                      self.se_reduction, self.dtype, self.local_gating,
                      name=name)(y, gate, train=train)
        if self.local_gating is not None:
          y, samples[name] = y
    if self.block != 'basic':
      y = nn.relu(batch_norm(train, self.dtype, 'bn_final')(y))
    y = jnp.mean(y, axis=(1, 2))
    if self.num_classes is not None:
      y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    y = y.astype(jnp.float32)
    return y if self.local_gating is None else (y, samples)


def cifar_resnet(depth: int = 20, widths: Sequence[int] = (16, 32, 64),
                 stem_width: Optional[int] = None, **kwargs) -> CifarResNet:
  """Basic-block CIFAR ResNet of depth 6n+2."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'cifar_resnet depth must be 6n+2 (8, 20, 32, 44, 56, '
                     f'110, ...); got {depth}.')
  n = (depth - 2) // 6
  widths = tuple(int(w) for w in widths)
  kwargs['local_gating'] = parse_local_gating(kwargs.get('local_gating'))
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
  kwargs['local_gating'] = parse_local_gating(kwargs.get('local_gating'))
  return CifarResNet(stage_sizes=(n, n, n), widths=widths,
                     block='preact_bottleneck', stem_width=stem_width, **kwargs)
