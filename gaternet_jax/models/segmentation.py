"""Semantic segmentation heads for gated ResNet encoders (batch-shaping's
Cityscapes experiment).

A segmentation network is a registry ResNet with an `output_stride` (its
last stages dilated instead of strided, resnet.py) and a `SegmentationHead`:
a context module on the encoder's features, a per-pixel classifier, and
bilinear upsampling of the logits to the input size (in `ResNet.__call__`).

Heads:
- 'aspp' (DeepLabv3, Chen et al. 2017): parallel branches on the features:
  a 1x1 conv, 3x3 convs dilated by `rates`, and image pooling (global mean,
  1x1 conv, broadcast back), each conv-BN-ReLU with `width` filters;
  concatenated, projected by a 1x1 conv-BN-ReLU, dropout, 1x1 classifier.
- 'psp' (PSPNet, Zhao et al. 2017): the features average-pooled to `bins` x
  `bins` grids, each 1x1 conv-BN-ReLU with `width` filters and upsampled
  back; concatenated with the features, a 3x3 conv-BN-ReLU, dropout, 1x1
  classifier.

The head's gated site ('head', when `gated`) is the concatenation of its
context branches: a gater's gates, or the head's own batch-shaping gating
module (reading the encoder's features), switch off branch filters, and the
conv after the concatenation reads only the open ones. The site sits in the
backbone's GateSpec after the encoder's units, so losses, statistics and
MAC accounting treat it as any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax.models import layers
from gaternet_jax.models.backbone import GateWire
from gaternet_jax.models.layers import LocalGating

HEAD_KINDS = ('aspp', 'psp')
# The head's gated site in the GateSpec, after the encoder's.
HEAD_SITE = 'head'


@dataclasses.dataclass(frozen=True)
class SegmentationHead:
  """What a segmentation network puts on its encoder.

  Attributes:
    kind: 'aspp' or 'psp' (the module docstring).
    width: filters of every context branch and of the conv after them.
    rates: ASPP's dilation rates of its 3x3 branches (DeepLabv3: 6, 12, 18
      at output stride 16, doubled at 8).
    bins: PSP's pooling grids.
    dropout: rate before the classifier, in training.
    gated: the context branches' filters are a gated site.
  """

  kind: str = 'aspp'
  width: int = 256
  rates: Tuple[int, ...] = (6, 12, 18)
  bins: Tuple[int, ...] = (1, 2, 3, 6)
  dropout: float = 0.1
  gated: bool = True

  def __post_init__(self):
    object.__setattr__(self, 'rates', tuple(int(r) for r in self.rates))
    object.__setattr__(self, 'bins', tuple(int(b) for b in self.bins))
    if self.kind not in HEAD_KINDS:
      raise ValueError(
          f'segmentation.head must be one of {", ".join(map(repr, HEAD_KINDS))};'
          f' got {self.kind!r}.'
      )
    if self.width < 1 or not 0.0 <= self.dropout < 1.0:
      raise ValueError(
          f'segmentation needs head_width >= 1 and 0 <= dropout < 1; got '
          f'{self.width} and {self.dropout}.'
      )
    if any(r < 1 for r in self.rates) or any(b < 1 for b in self.bins):
      raise ValueError(
          f'segmentation.aspp_rates and psp_bins must be >= 1; got '
          f'{self.rates} and {self.bins}.'
      )

  @property
  def branches(self) -> Tuple[str, ...]:
    """Names of the context branch convs, in concatenation order."""
    if self.kind == 'aspp':
      return (
          ('aspp_1x1',)
          + tuple(f'aspp_rate{r}' for r in self.rates)
          + ('aspp_pool',)
      )
    return tuple(f'psp_bin{b}' for b in self.bins)

  @property
  def site_width(self) -> int:
    """Filters of the head's gated site: every branch's."""
    return self.width * len(self.branches)

  @property
  def fuse(self) -> str:
    """The conv that reads the concatenated branches."""
    return 'project' if self.kind == 'aspp' else 'bottleneck'

  def wiring(self, path: Tuple[str, ...]) -> Tuple[GateWire, ...]:
    """The head site's gates act on each branch conv's outputs (its slice
    of the site) and on the fusing conv's first inputs."""
    out = tuple(
        GateWire(
            path + (name, 'conv'),
            'out',
            0,
            k * self.width,
            (k + 1) * self.width,
        )
        for k, name in enumerate(self.branches)
    )
    return out + (GateWire(path + (self.fuse, 'conv'), 'in'),)


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """`(bins, size)` averaging weights of PyTorch's adaptive average pooling:
  bin i covers [floor(i * size / bins), ceil((i + 1) * size / bins))."""
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, -(-((i + 1) * size) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


class _ConvBNReLU(nn.Module):
  features: int
  kernel: int
  dilation: int
  dtype: Any
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kwargs = {'dilation': self.dilation} if self.dilation != 1 else {}
    x = self.conv(self.features, self.kernel, 1, self.dtype, 'conv', **kwargs)(
        x
    )
    return nn.relu(self.norm(train, self.dtype, 'bn')(x))


class ContextHead(nn.Module):
  """An ASPP or PSP head: `(batch, h, w, c)` encoder features ->
  (`(batch, h, w, num_classes)` float32 logits, local gate sample or None).

  `gate` is the head site's `(batch, site_width)` gates from a gater (or
  None). With `local_gating` the head samples its own from the features
  (`gate`, when given, replaces the sample's binary gates, as in the
  units).
  """

  head: SegmentationHead
  num_classes: int
  dtype: Any = jnp.float32
  local_gating: Optional[LocalGating] = None
  conv: Callable = layers.conv
  norm: Callable = layers.batch_norm

  @nn.compact
  def __call__(
      self, x: jax.Array, gate: Optional[jax.Array], *, train: bool
  ) -> Tuple[jax.Array, Optional[dict]]:
    h = self.head
    sample = None
    if self.local_gating is not None and h.gated:
      sample = self.local_gating.module(h.site_width, self.dtype)(
          x, train=train
      )
      if gate is not None:
        sample = dict(sample, gate=gate.astype(sample['gate'].dtype))
      gate = sample['gate']
    branch = lambda name, kernel=1, dilation=1: _ConvBNReLU(  # noqa: E731
        h.width, kernel, dilation, self.dtype, self.conv, self.norm, name=name
    )
    size = x.shape[1:3]
    parts = []
    if h.kind == 'aspp':
      parts.append(branch('aspp_1x1')(x, train=train))
      for r in h.rates:
        parts.append(branch(f'aspp_rate{r}', 3, r)(x, train=train))
      pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
      pooled = branch('aspp_pool')(pooled, train=train)
      parts.append(jnp.broadcast_to(pooled, x.shape[:3] + (h.width,)))
    else:
      for b in h.bins:
        rows = jnp.asarray(adaptive_pool_matrix(size[0], b), x.dtype)
        cols = jnp.asarray(adaptive_pool_matrix(size[1], b), x.dtype)
        pooled = jnp.einsum('ih,jw,bhwc->bijc', rows, cols, x)
        pooled = branch(f'psp_bin{b}')(pooled, train=train)
        parts.append(
            jax.image.resize(
                pooled, x.shape[:3] + (h.width,), 'bilinear'
            ).astype(x.dtype)
        )
    y = jnp.concatenate(parts, axis=-1)
    if gate is not None:
      y = layers.gate_channels(y, gate)
    if h.kind == 'aspp':
      y = branch('project')(y, train=train)
    else:
      y = jnp.concatenate([y, x.astype(y.dtype)], axis=-1)
      y = branch('bottleneck', 3)(y, train=train)
    y = nn.Dropout(h.dropout, deterministic=not train)(y)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(y)
    return logits.astype(jnp.float32), sample
