"""ResNets that accept a gate PyTree: the residual units and the network
that the CIFAR and ImageNet families (resnet_cifar.py, resnet_imagenet.py)
share.

As in flax's ImageNet example, one `ResNet` takes its parts: the unit
(`block_cls`: `BasicBlock`, `Bottleneck` or `PreActBottleneck`), the conv
and the norm (`conv`, `norm`, by default layers.py's, set up as the
official code sets them), the stem ('cifar': a 3x3 conv; 'imagenet': a 7x7/2
conv and a 3x3/2 max-pool), and the units' gating: none, a gater's gates,
or (`local_gating`) batch-shaping's gating module inside every unit.

Every unit maps `(x, gate, train=)` to `(y, sample)`: `gate` is its site's
`(batch, filters)` gates from a gater (or None), `sample` its own gate sample
when locally gated (else None). A gater's gates act at the unit's last conv,
after that conv's BN (pre-activation units have none there) and before the
residual add: the site the official code gates, where the SE unit of the
ResNet-SE baselines also sits. Local gates act inside the unit, on the
channels between two convs, so the next conv reads only the open ones.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models import layers
from gaternet_jax.models.backbone import (
    GATE_SAMPLES,
    UNSEEN_GATES,
    Extras,
    GateWire,
)
from gaternet_jax.models.compaction import Compaction, SitePlan
from gaternet_jax.models.layers import LocalGating, SqueezeExcite
from gaternet_jax.models.segmentation import (
    HEAD_SITE,
    ContextHead,
    SegmentationHead,
)

# Bottleneck units output `EXPANSION * width` channels.
EXPANSION = 4

# A unit's width: an int, or (inner, output) for pre-activation bottlenecks.
Width = Union[int, Tuple[int, int]]


class _Unit(nn.Module):
  """What every residual unit shares: its fields and its gated parts."""

  # The conv whose output a gater's gates act on.
  last_conv: ClassVar[str] = ''
  # Where local gates may act: the convs whose outputs they gate.
  local_positions: ClassVar[Tuple[str, ...]] = ('conv1',)

  features: Any
  stride: int
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None
  conv: Callable = layers.conv
  norm: Callable = layers.batch_norm
  # A compacted unit's site (models/compaction.py), or None.
  compaction: Optional[SitePlan] = None
  # Dilation of the unit's 3x3 convs (a dilated stage of a network with an
  # output stride, ResNet.output_stride).
  dilation: int = 1

  @classmethod
  def site_width(cls, features: Width, locally_gated: bool) -> int:
    """Filters of the unit's gated site (its inner channels when locally
    gated, else its output)."""
    raise NotImplementedError

  def _gates(
      self, x: jax.Array, features: int, gate: Optional[jax.Array], train: bool
  ):
    """(local sample, gater gate) of the unit.

    With local gating the unit's own module samples its gates from its
    input (`gate`, when given, replaces the sample's binary gates: fixed
    gate patterns for benchmarks and tests) and the gater's gate is None;
    without, the sample is None and `gate` is the gater's.
    """
    if self.local_gating is None:
      return None, gate
    sample = self.local_gating.module(features, self.dtype)(x, train=train)
    if self.compaction is not None:
      # The module computes every gate; the unit uses the input-dependent
      # ones and counts the constant ones that leave their pattern.
      unseen = self.compaction.unseen(sample['gate'])
      sample = {k: self.compaction.select(v) for k, v in sample.items()}
      sample['unseen'] = unseen
    if gate is not None:
      sample = dict(sample, gate=gate.astype(sample['gate'].dtype))
    return sample, None

  def _width(self, full: int) -> int:
    """Channels of the gated conv: `full`, or the compacted site's kept
    ones."""
    return full if self.compaction is None else self.compaction.width

  def _conv(
      self, y, features: int, kernel: int, stride: int, name: str
  ) -> jax.Array:
    """`self.conv`, 3x3 convs dilated by `dilation`; a compacted conv with
    no channels left, on either side, computes nothing: zeros."""
    if features and y.shape[-1]:
      kwargs = (
          {'dilation': self.dilation}
          if kernel > 1 and self.dilation > 1
          else {}
      )
      return self.conv(features, kernel, stride, self.dtype, name, **kwargs)(y)
    b, h, w, _ = y.shape
    return jnp.zeros((b, -(-h // stride), -(-w // stride), features), y.dtype)

  def _mask(self, y: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
    """Eq. 4's channel mask; a compacted site's gates act on its first
    channels (the input-dependent ones)."""
    if gate is None:
      return y
    if self.compaction is not None:
      b, kept = y.shape[0], self.compaction.width
      gate = jnp.concatenate(
          [gate.astype(y.dtype), jnp.ones((b, kept - gate.shape[1]), y.dtype)],
          axis=-1,
      )
    return layers.gate_channels(y, gate)

  def _add(self, y: jax.Array, shortcut: jax.Array) -> jax.Array:
    """The residual add; a compacted gater site adds its kept channels at
    their places."""
    if self.compaction is None or self.local_gating is not None:
      return y + shortcut
    return shortcut.at[..., np.asarray(self.compaction.channels)].add(y)

  def _branch_removed(self) -> bool:
    """A compacted gater site whose every gate is off: the unit is its
    shortcut."""
    return (
        self.compaction is not None
        and self.local_gating is None
        and self.compaction.width == 0
    )

  def _widths(self, inner: int, out: int) -> Tuple[int, int, int]:
    """Output channels of a bottleneck's three convs, the gated one
    compacted."""
    widths = [inner, inner, out]
    if self.local_gating is None:
      widths[2] = self._width(out)
    else:
      at = self.local_positions.index(self.local_gating.position)
      widths[at] = self._width(inner)
    return widths[0], widths[1], widths[2]

  def _site(self, y: jax.Array, gate: Optional[jax.Array]) -> jax.Array:
    """The gater's site: SE re-scaling and/or Eq. 4's channel mask."""
    se = (
        SqueezeExcite(self.se_reduction, self.dtype, name='se')
        if self.se_reduction
        else None
    )
    return self._mask(layers.apply_site(y, None, se), gate)

  def _local(self, y: jax.Array, sample, here: str) -> jax.Array:
    """`y` gated by the unit's local sample if it acts after conv `here`."""
    if sample is None or self.local_gating.position != here:
      return y
    return self._mask(y, sample['gate'])

  def _projection(
      self, x: jax.Array, features: int, train: bool, with_norm: bool = True
  ) -> jax.Array:
    """Identity, or conv1x1/stride (+ norm) where the shape changes."""
    if x.shape[-1] == features and self.stride == 1:
      return x
    x = self.conv(features, 1, self.stride, self.dtype, 'shortcut_conv')(x)
    return self.norm(train, self.dtype, 'shortcut_bn')(x) if with_norm else x


class BasicBlock(_Unit):
  """conv3x3-BN-ReLU-[local gate]-conv3x3-BN-[SE][gate]-(+shortcut)-ReLU.

  `features`: output channels of both convs. Local gates act on conv1's
  channels.
  """

  last_conv: ClassVar[str] = 'conv2'

  @classmethod
  def site_width(cls, features: Width, locally_gated: bool) -> int:
    return int(features)

  @nn.compact
  def __call__(self, x: jax.Array, gate: Optional[jax.Array], *, train: bool):
    """`(batch, h, w, c)` -> (`(batch, h / stride, w / stride, features)`,
    sample)."""
    sample, gate = self._gates(x, self.features, gate, train)
    if self._branch_removed():
      return nn.relu(self._projection(x, self.features, train)), sample
    local = self.local_gating is not None
    width = self._width(self.features)
    y = self._conv(
        x, width if local else self.features, 3, self.stride, 'conv1'
    )
    y = nn.relu(self.norm(train, self.dtype, 'bn1')(y))
    y = self._local(y, sample, 'conv1')
    y = self._conv(y, self.features if local else width, 3, 1, 'conv2')
    y = self.norm(train, self.dtype, 'bn2')(y)
    y = self._site(y, gate)
    y = nn.relu(self._add(y, self._projection(x, self.features, train)))
    return y, sample


class Bottleneck(_Unit):
  """conv1x1-BN-ReLU-conv3x3/s-BN-ReLU-conv1x1-BN-[SE][gate]-(+shortcut)-ReLU.

  `features`: the inner convs' width; the unit outputs `EXPANSION` times
  that. Strides on its 3x3 conv (torchvision's "v1.5"). Local gates act on
  the inner channels after conv1 or conv2 (`local_gating.position`).
  """

  last_conv: ClassVar[str] = 'conv3'
  local_positions: ClassVar[Tuple[str, ...]] = ('conv1', 'conv2')

  @classmethod
  def site_width(cls, features: Width, locally_gated: bool) -> int:
    return int(features) * (1 if locally_gated else EXPANSION)

  @nn.compact
  def __call__(self, x: jax.Array, gate: Optional[jax.Array], *, train: bool):
    """`(batch, h, w, c)` -> (`(batch, h / stride, w / stride, 4 * width)`,
    sample)."""
    width, out = self.features, EXPANSION * self.features
    sample, gate = self._gates(x, width, gate, train)
    if self._branch_removed():
      return nn.relu(self._projection(x, out, train)), sample
    w1, w2, w3 = self._widths(width, out)
    y = self._conv(x, w1, 1, 1, 'conv1')
    y = nn.relu(self.norm(train, self.dtype, 'bn1')(y))
    y = self._local(y, sample, 'conv1')
    y = self._conv(y, w2, 3, self.stride, 'conv2')
    y = nn.relu(self.norm(train, self.dtype, 'bn2')(y))
    y = self._local(y, sample, 'conv2')
    y = self._conv(y, w3, 1, 1, 'conv3')
    y = self.norm(train, self.dtype, 'bn3')(y)
    y = self._site(y, gate)
    y = nn.relu(self._add(y, self._projection(x, out, train)))
    return y, sample


class PreActBottleneck(_Unit):
  """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-[SE][gate]-(+shortcut).

  `features`: `(inner width, output width)`. The projection shortcut reads
  the pre-activated input and has no BN. Local gates act on the inner
  channels after conv1 or conv2 (`local_gating.position`).
  """

  last_conv: ClassVar[str] = 'conv3'
  local_positions: ClassVar[Tuple[str, ...]] = ('conv1', 'conv2')

  @classmethod
  def site_width(cls, features: Width, locally_gated: bool) -> int:
    inner, out = features
    return int(inner if locally_gated else out)

  @nn.compact
  def __call__(self, x: jax.Array, gate: Optional[jax.Array], *, train: bool):
    mid, out = self.features
    sample, gate = self._gates(x, mid, gate, train)
    identity = x.shape[-1] == out and self.stride == 1
    if self._branch_removed() and identity:
      return x, sample
    pre = nn.relu(self.norm(train, self.dtype, 'bn1')(x))
    shortcut = (
        x if identity else self._projection(pre, out, train, with_norm=False)
    )
    if self._branch_removed():
      return shortcut, sample
    w1, w2, w3 = self._widths(mid, out)
    y = self._conv(pre, w1, 1, 1, 'conv1')
    y = nn.relu(self.norm(train, self.dtype, 'bn2')(y))
    y = self._local(y, sample, 'conv1')
    y = self._conv(y, w2, 3, self.stride, 'conv2')
    y = nn.relu(self.norm(train, self.dtype, 'bn3')(y))
    y = self._local(y, sample, 'conv2')
    y = self._conv(y, w3, 1, 1, 'conv3')
    y = self._site(y, gate)
    return self._add(y, shortcut), sample


STEMS = ('cifar', 'imagenet')


class ResNet(nn.Module):
  """A ResNet whose first stage keeps the stem's resolution and whose later
  stages halve it.

  Attributes:
    stage_sizes: residual units per stage.
    widths: per stage, the units' `features` (see each unit class).
    block_cls: the unit class.
    stem: 'cifar' (3x3 conv, + BN-ReLU for post-activation units) or
      'imagenet' (7x7/2 conv-BN-ReLU, 3x3/2 max-pool).
    stem_width: filters of the stem conv; None means the first stage's
      width (its output width for pre-activation units).
    num_classes: classifier outputs; None returns pooled features.
    se_reduction: >0 adds squeeze-and-excitation at each unit's site.
    local_gating: None (gates, if any, come from a gater) or batch-shaping's
      channel gating inside each unit.
    conv, norm: the layer constructors, `conv(features, kernel, stride,
      dtype, name[, dilation])` and `norm(train, dtype, name)`.
    output_stride: None, or the largest stride of the features (a
      segmentation encoder: 8 or 16): units that would stride past it
      stride 1 and dilate their 3x3 convs instead, torchvision's
      `replace_stride_with_dilation` (the first unit of a dilated stage
      keeps the previous dilation).
    head: None (a classifier), or a segmentation head
      (models/segmentation.py): the network then maps images to
      `(batch, h, w, num_classes)` per-pixel logits, and the head's gated
      site follows the units' in the gate spec.
  """

  supports_local_gating: ClassVar[bool] = True

  stage_sizes: Sequence[int]
  widths: Sequence[Width]
  block_cls: Any = BasicBlock
  stem: str = 'cifar'
  stem_width: Optional[int] = None
  num_classes: Optional[int] = 10
  se_reduction: int = 0
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None
  conv: Callable = layers.conv
  norm: Callable = layers.batch_norm
  compaction: Optional[Compaction] = None
  output_stride: Optional[int] = None
  head: Optional[SegmentationHead] = None

  def _units(self):
    """(site name, stride, unit features) of every unit in depth order."""
    for s, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      features = (
          tuple(int(v) for v in w) if isinstance(w, (tuple, list)) else int(w)
      )
      for b in range(n):
        yield (
            f'stage{s + 1}_block{b + 1}',
            2 if (s > 0 and b == 0) else 1,
            features,
        )

  def stem_stride(self) -> int:
    """Stride of the stem: 4 ('imagenet': conv/2 and max-pool/2) or 1."""
    return 4 if self.stem == 'imagenet' else 1

  def unit_layout(self):
    """(site name, stride, unit features, dilation) of every unit in depth
    order, with the output stride's dilation in place of late strides."""
    current, dilation = self.stem_stride(), 1
    for name, stride, features in self._units():
      unit_dilation = dilation
      if self.output_stride and current * stride > self.output_stride:
        dilation *= stride
        stride = 1
      else:
        current *= stride
      # The unit that stops striding keeps the previous dilation; the
      # units after it take the new one.
      yield name, stride, features, unit_dilation

  def stem_features(self) -> int:
    """Filters of the stem conv: `stem_width`, or the first stage's width
    (its output width for pre-activation units)."""
    first = self.widths[0]
    return int(
        self.stem_width
        or (first[-1] if isinstance(first, (tuple, list)) else first)
    )

  def gate_spec(self) -> GateSpec:
    """The gated sites, one per residual unit, in depth order: the unit's
    output channels, or with local gating its gated inner channels."""
    if self.compaction is not None:
      return self.compaction.spec()
    return self.uncompacted_gate_spec()

  def uncompacted_gate_spec(self) -> GateSpec:
    """The gate spec of the network before any compaction."""
    local = self.local_gating is not None
    sites = tuple(
        (name, self.block_cls.site_width(f, local))
        for name, _, f in self._units()
    )
    if self.head is not None and self.head.gated:
      sites += ((HEAD_SITE, self.head.site_width),)
    return GateSpec(sites)

  def gate_wiring(self):
    """A gater's gates switch off the outputs of each unit's last conv;
    local gates those of the gated conv and the inputs of the conv after
    it."""
    out = {}
    sites = set(self.gate_spec().names)
    for name, _, _ in self._units():
      if name not in sites:
        continue  # A compacted unit without input-dependent gates.
      if self.local_gating is None:
        out[name] = (GateWire((name, self.block_cls.last_conv), 'out'),)
      else:
        at = self.local_gating.position
        reader = 'conv2' if at == 'conv1' else 'conv3'
        out[name] = (
            GateWire((name, at), 'out'),
            GateWire((name, reader), 'in'),
        )
    if HEAD_SITE in sites and self.head is not None:
      out[HEAD_SITE] = self.head.wiring(('head',))
    return out

  def _check(self, gates: Optional[Gates]):
    if self.stem not in STEMS:
      raise ValueError(f'stem must be one of {STEMS}; got {self.stem!r}.')
    os_ = self.output_stride
    if os_ is not None and (os_ < self.stem_stride() or os_ & (os_ - 1) != 0):
      raise ValueError(
          f"output_stride must be a power of 2 and at least the stem's "
          f'stride {self.stem_stride()}; got {os_}.'
      )
    if self.head is not None and self.num_classes is None:
      raise ValueError('a segmentation head needs num_classes.')
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
          f'stage_sizes {tuple(self.stage_sizes)} and widths '
          f'{tuple(self.widths)} differ in length.'
      )
    if self.local_gating is not None:
      if self.local_gating.position not in self.block_cls.local_positions:
        raise ValueError(
            f'{self.block_cls.__name__} units gate at local_gating.position '
            f'{" or ".join(map(repr, self.block_cls.local_positions))}; got '
            f'{self.local_gating.position!r}.'
        )

  @nn.compact
  def __call__(
      self, x: jax.Array, gates: Optional[Gates] = None, *, train: bool = False
  ) -> Tuple[jax.Array, Extras]:
    """`(batch, h, w, c)` normalised images -> (logits, extras); with a
    segmentation `head`, `(batch, h, w, num_classes)` per-pixel logits.

    Args:
      x: images.
      gates: None, or `{site: (batch, filters)}` for every site of
        `gate_spec()`: a gater's gates, or with local gating fixed gates
        that replace the units' own (benchmarks and tests).
      train: BN uses batch statistics (and updates 'batch_stats') if True.

    Returns:
      `(batch, num_classes)` float32 logits (pooled features when
      `num_classes` is None), and `extras`: with local gating,
      {'gate_samples': {site: {'gate', 'value', 'prob'}}}, else {}.
    """
    self._check(gates)
    preact = self.block_cls is PreActBottleneck
    stem_width = self.stem_features()
    y = x.astype(self.dtype)
    if self.stem == 'imagenet':
      y = self.conv(stem_width, 7, 2, self.dtype, 'conv')(y)
      y = nn.relu(self.norm(train, self.dtype, 'bn')(y))
      # torchvision's MaxPool2d(3, 2, padding=1); flax pads with -inf, so
      # the padding never wins the max.
      y = nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      y = self.conv(stem_width, 3, 1, self.dtype, 'conv')(y)
      if not preact:
        y = nn.relu(self.norm(train, self.dtype, 'bn')(y))
    samples, unseen = {}, []
    sites = set(self.gate_spec().names)
    for name, stride, features, dilation in self.unit_layout():
      gate = None if gates is None else gates.get(name)
      y, sample = self.block_cls(
          features,
          stride,
          self.se_reduction,
          self.dtype,
          self.local_gating,
          self.conv,
          self.norm,
          None if self.compaction is None else self.compaction.site(name),
          dilation=dilation,
          name=name,
      )(y, gate, train=train)
      if sample is not None:
        if 'unseen' in sample:
          unseen.append(sample.pop('unseen'))
        if name in sites:
          samples[name] = sample
    if preact:
      y = nn.relu(self.norm(train, self.dtype, 'bn_final')(y))
    if self.head is not None:
      assert self.num_classes is not None  # _check
      y, sample = ContextHead(
          self.head,
          self.num_classes,
          self.dtype,
          self.local_gating,
          self.conv,
          self.norm,
          name='head',
      )(y, None if gates is None else gates.get(HEAD_SITE), train=train)
      if sample is not None:
        samples[HEAD_SITE] = sample
      # Bilinear upsampling of the logits to the input's size.
      b, h, w = x.shape[:3]
      y = jax.image.resize(y, (b, h, w, y.shape[-1]), 'bilinear')
    else:
      y = jnp.mean(y, axis=(1, 2))
      if self.num_classes is not None:
        y = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(y)
    extras: Extras = {GATE_SAMPLES: samples} if samples else {}
    if unseen:
      extras[UNSEEN_GATES] = sum(unseen)
    return y.astype(jnp.float32), extras
