"""Inception-v4 (Szegedy et al., AAAI 2017) that accepts a gate PyTree.

The layout, the layer names and the padding follow TF-slim's
`nets/inception_v4.py` (the reference implementation of the Inception-v4
paper) on 299x299x3 inputs:

  stem      Conv2d_1a_3x3 .. Conv2d_2b_3x3, Mixed_3a, Mixed_4a, Mixed_5a
                                                  -> 35x35x384
  4 x A     Mixed_5b .. Mixed_5e                  -> 35x35x384
  Red-A     Mixed_6a                              -> 17x17x1024
  7 x B     Mixed_6b .. Mixed_6h                  -> 17x17x1024
  Red-B     Mixed_7a                              -> 8x8x1536
  3 x C     Mixed_7b .. Mixed_7d                  -> 8x8x1536
  head      global average pool, dropout (keep 0.8), fc

Every conv is conv (no bias) -> BN -> ReLU ('ConvBN'). BN follows TF-slim's
`inception_arg_scope`: epsilon 1e-3, decay 0.9997 and no scale (gamma),
since a ReLU follows every BN; all three are attributes. The optional
auxiliary classifier (TF-slim's `AuxLogits` on Mixed_6h: 5x5/3 average
pool, 1x1 conv 128, conv 768 over the remaining 5x5 grid, fc) is built when
`aux_logits=True`; in training its `(batch, num_classes)` float32 logits
come back in the extras of `__call__`'s `(logits, extras)` as 'aux_logits'
(TF-slim weights that loss by 0.4).

Gated sites (GaterNet section 4.4: "In Inception-v4, there are many channel
concatenation operations. We apply filter selection to all the feature maps
after the channel concatenation operations."): each block's output
concatenation is one site, named after the block, with one gate per output
channel. Channels of max-pool branches (pass-through channels of the
previous concatenation) are gated as well, being part of the concatenation.
The 19 sites give exactly the paper's 16,608 gated filters (Table 3):

  stem   Mixed_3a 64+96 = 160, Mixed_4a 96+96 = 192, Mixed_5a 192+192 = 384
                                                                =   736
  A      4 x (96+96+96+96 = 384)                                = 1,536
  Red-A  384+256+384 (pool)                                     = 1,024
  B      7 x (384+256+256+128 = 1,024)                          = 7,168
  Red-B  192+320+1024 (pool)                                    = 1,536
  C      3 x (256+512+512+256 = 1,536)                          = 4,608
                                                          total  16,608

The alternatives all miss it: without the stem's three concatenations
15,872; without the two reductions 14,048; adding Inception-C's six inner
concatenations (the 1x3/3x1 pairs of 2 x 256 that feed each C block's
output concatenation, so those channels would be gated twice) 19,680.

Parameters ('params' collection, exact; Table 3 says 44.50M for
Inception-v4 and 61.67M for Inception-v4-Gated), 1000 classes:

                           BN without scale (TF-slim)   BN with scale
  no aux head (default)     42,648,232 = 42.65M         42,679,816 = 42.68M
  with the aux head         46,006,800 = 46.01M         46,039,280 = 46.04M

(TF-slim's 1001 classes add 1,537 without and 2,306 with the aux head.)
No variant gives 44.50M: Inception-v4 as TF-slim defines it is 42.65-42.68M
and its auxiliary head adds 3.36M (1x1 conv 1024->128, 5x5 conv 128->768,
fc 768->classes), so the baseline's published count is reproduced neither
with nor without it. The gated count does not follow from 44.50M either:
the gater of Table 3's ResNet rows, a ResNet-18 feature extractor
(11,176,512) + FC 512->256 (131,328) + BN (512) + FC 256->16,608
(4,268,256) = 15,576,608, gives 44.50 + 15.58 = 60.08M, not 61.67M; the
1.59M gap would need a bottleneck of about 349 instead of the stated 256.
That gater does reproduce the ResNet rows exactly (ResNet-101-Gated:
44.55 + 11.18 + 0.13 + 8.36 = 64.21M), so the Inception-v4 rows are the
ones that disagree. With the aux head, 46.01M / 46.04M + 15.58M =
61.58M / 61.62M, 0.09M / 0.06M short of 61.67M: the gated count likely
includes the auxiliary head (used in training) and the baseline's does not
match any variant. We keep the architecture as defined and record the
discrepancy rather than adjust it; `aux_logits=False` is the default.

`width` scales every conv's filters (1.0 is the paper's model); it exists
so that tests can run real forward passes at small cost. The smallest
input that leaves a non-empty grid after the valid-padded stem and
reductions is 75x75 (107x107 with the aux head, whose 5x5 pool needs a
5x5 grid at Mixed_6h). With
`num_classes=None` the network returns its pooled `(batch, 1536)` features.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import GateSpec, Gates
from gaternet_jax.models.backbone import AUX_LOGITS, Extras, GateWire
from gaternet_jax.models.layers import apply_site

# TF-slim's inception_arg_scope: variance_scaling_initializer() (factor 2,
# fan_in, truncated normal) for convs; xavier (glorot uniform) for the fc.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
_fc_init = nn.initializers.glorot_uniform()

# TF-slim's names of the 19 concatenating blocks: the gated sites.
STEM_SITES = ('Mixed_3a', 'Mixed_4a', 'Mixed_5a')
A_SITES = tuple(f'Mixed_5{s}' for s in 'bcde')  # 4 x Inception-A
B_SITES = tuple(f'Mixed_6{s}' for s in 'bcdefgh')  # 7 x Inception-B
C_SITES = tuple(f'Mixed_7{s}' for s in 'bcd')  # 3 x Inception-C
SITES = STEM_SITES + A_SITES + ('Mixed_6a',) + B_SITES + ('Mixed_7a',) + C_SITES


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """What every ConvBN of one network shares."""

  width: float = 1.0
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  bn_scale: bool = False
  dtype: Any = jnp.float32

  def ch(self, n: int) -> int:
    """The scaled filter count of a conv with `n` filters at width 1."""
    return max(1, int(round(n * self.width)))


class ConvBN(nn.Module):
  """conv (no bias) -> BN -> ReLU; kernels may be non-square (1x7, 7x1)."""

  cfg: ConvConfig
  features: int  # at width 1; scaled by cfg.width
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Any = 'SAME'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """`(batch, h, w, c)` -> `(batch, h', w', cfg.ch(features))`."""
    c = self.cfg
    y = nn.Conv(
        c.ch(self.features),
        self.kernel,
        strides=self.strides,
        padding=self.padding,
        use_bias=False,
        kernel_init=_conv_init,
        dtype=c.dtype,
        name='conv',
    )(x)
    y = nn.BatchNorm(
        use_running_average=not train,
        momentum=c.bn_momentum,
        epsilon=c.bn_epsilon,
        use_scale=c.bn_scale,
        dtype=c.dtype,
        name='bn',
    )(y)
    return nn.relu(y)


def _cbn(cfg, features, kernel, name, strides=1, padding='SAME'):
  if isinstance(kernel, int):
    kernel = (kernel, kernel)
  return ConvBN(cfg, features, tuple(kernel), strides, padding, name=name)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def _avg_pool_3x3(x):
  # TF's SAME average pooling divides by the number of valid inputs.
  return nn.avg_pool(
      x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False
  )


def _concat(branches: Sequence[jax.Array], gate: Optional[jax.Array]):
  """The gated site: a block's channel concatenation, then Eq. 4's mask."""
  return apply_site(jnp.concatenate(branches, axis=-1), gate, None)


class Mixed3a(nn.Module):
  """Stem, 147x147x64 -> 73x73x160: maxpool 3x3/2 | conv 3x3/2 (96)."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    b1 = _cbn(self.cfg, 96, 3, 'Branch_1_Conv2d_0a_3x3', 2, 'VALID')(
        x, train=train
    )
    return _concat([_max_pool_3x3_s2(x), b1], gate)


class Mixed4a(nn.Module):
  """Stem, 73x73x160 -> 71x71x192: 1x1-3x3 (96) | 1x1-1x7-7x1-3x3 (96)."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 64, 1, 'Branch_0_Conv2d_0a_1x1')(x, train=train)
    b0 = _cbn(c, 96, 3, 'Branch_0_Conv2d_1a_3x3', 1, 'VALID')(b0, train=train)
    b1 = _cbn(c, 64, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 64, (1, 7), 'Branch_1_Conv2d_0b_1x7')(b1, train=train)
    b1 = _cbn(c, 64, (7, 1), 'Branch_1_Conv2d_0c_7x1')(b1, train=train)
    b1 = _cbn(c, 96, 3, 'Branch_1_Conv2d_1a_3x3', 1, 'VALID')(b1, train=train)
    return _concat([b0, b1], gate)


class Mixed5a(nn.Module):
  """Stem, 71x71x192 -> 35x35x384: conv 3x3/2 (192) | maxpool 3x3/2."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    b0 = _cbn(self.cfg, 192, 3, 'Branch_0_Conv2d_1a_3x3', 2, 'VALID')(
        x, train=train
    )
    return _concat([b0, _max_pool_3x3_s2(x)], gate)


class InceptionA(nn.Module):
  """35x35 block: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | avgpool-1x1 (4 x 96)."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 96, 1, 'Branch_0_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 64, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 96, 3, 'Branch_1_Conv2d_0b_3x3')(b1, train=train)
    b2 = _cbn(c, 64, 1, 'Branch_2_Conv2d_0a_1x1')(x, train=train)
    b2 = _cbn(c, 96, 3, 'Branch_2_Conv2d_0b_3x3')(b2, train=train)
    b2 = _cbn(c, 96, 3, 'Branch_2_Conv2d_0c_3x3')(b2, train=train)
    b3 = _cbn(c, 96, 1, 'Branch_3_Conv2d_0b_1x1')(_avg_pool_3x3(x), train=train)
    return _concat([b0, b1, b2, b3], gate)


class ReductionA(nn.Module):
  """35x35x384 -> 17x17x1024: 3x3/2 (384) | 1x1-3x3-3x3/2 (256) | maxpool."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 384, 3, 'Branch_0_Conv2d_1a_3x3', 2, 'VALID')(x, train=train)
    b1 = _cbn(c, 192, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 224, 3, 'Branch_1_Conv2d_0b_3x3')(b1, train=train)
    b1 = _cbn(c, 256, 3, 'Branch_1_Conv2d_1a_3x3', 2, 'VALID')(b1, train=train)
    return _concat([b0, b1, _max_pool_3x3_s2(x)], gate)


class InceptionB(nn.Module):
  """17x17 block: 1x1 (384) | 1x7-7x1 (256) | 7x1-1x7 x2 (256) | pool (128)."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 384, 1, 'Branch_0_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 192, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 224, (1, 7), 'Branch_1_Conv2d_0b_1x7')(b1, train=train)
    b1 = _cbn(c, 256, (7, 1), 'Branch_1_Conv2d_0c_7x1')(b1, train=train)
    b2 = _cbn(c, 192, 1, 'Branch_2_Conv2d_0a_1x1')(x, train=train)
    b2 = _cbn(c, 192, (7, 1), 'Branch_2_Conv2d_0b_7x1')(b2, train=train)
    b2 = _cbn(c, 224, (1, 7), 'Branch_2_Conv2d_0c_1x7')(b2, train=train)
    b2 = _cbn(c, 224, (7, 1), 'Branch_2_Conv2d_0d_7x1')(b2, train=train)
    b2 = _cbn(c, 256, (1, 7), 'Branch_2_Conv2d_0e_1x7')(b2, train=train)
    b3 = _cbn(c, 128, 1, 'Branch_3_Conv2d_0b_1x1')(
        _avg_pool_3x3(x), train=train
    )
    return _concat([b0, b1, b2, b3], gate)


class ReductionB(nn.Module):
  """17x17x1024 -> 8x8x1536: 1x1-3x3/2 (192) | 1x1-1x7-7x1-3x3/2 (320) |
  maxpool."""

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 192, 1, 'Branch_0_Conv2d_0a_1x1')(x, train=train)
    b0 = _cbn(c, 192, 3, 'Branch_0_Conv2d_1a_3x3', 2, 'VALID')(b0, train=train)
    b1 = _cbn(c, 256, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 256, (1, 7), 'Branch_1_Conv2d_0b_1x7')(b1, train=train)
    b1 = _cbn(c, 320, (7, 1), 'Branch_1_Conv2d_0c_7x1')(b1, train=train)
    b1 = _cbn(c, 320, 3, 'Branch_1_Conv2d_1a_3x3', 2, 'VALID')(b1, train=train)
    return _concat([b0, b1, _max_pool_3x3_s2(x)], gate)


class InceptionC(nn.Module):
  """8x8 block: 1x1 | 1x1-(1x3,3x1) | 1x1-3x1-1x3-(1x3,3x1) | pool (6 x 256).

  The two inner (1x3, 3x1) concatenations are not sites: their channels are
  gated once, at the block's output concatenation.
  """

  cfg: ConvConfig

  @nn.compact
  def __call__(self, x, gate, *, train: bool):
    c = self.cfg
    b0 = _cbn(c, 256, 1, 'Branch_0_Conv2d_0a_1x1')(x, train=train)
    b1 = _cbn(c, 384, 1, 'Branch_1_Conv2d_0a_1x1')(x, train=train)
    b1 = [
        _cbn(c, 256, (1, 3), 'Branch_1_Conv2d_0b_1x3')(b1, train=train),
        _cbn(c, 256, (3, 1), 'Branch_1_Conv2d_0c_3x1')(b1, train=train),
    ]
    b2 = _cbn(c, 384, 1, 'Branch_2_Conv2d_0a_1x1')(x, train=train)
    b2 = _cbn(c, 448, (3, 1), 'Branch_2_Conv2d_0b_3x1')(b2, train=train)
    b2 = _cbn(c, 512, (1, 3), 'Branch_2_Conv2d_0c_1x3')(b2, train=train)
    b2 = [
        _cbn(c, 256, (1, 3), 'Branch_2_Conv2d_0d_1x3')(b2, train=train),
        _cbn(c, 256, (3, 1), 'Branch_2_Conv2d_0e_3x1')(b2, train=train),
    ]
    b3 = _cbn(c, 256, 1, 'Branch_3_Conv2d_0b_1x1')(
        _avg_pool_3x3(x), train=train
    )
    # Concatenating the flattened list equals TF-slim's nested concats.
    return _concat([b0, *b1, *b2, b3], gate)


class AuxHead(nn.Module):
  """TF-slim's AuxLogits on Mixed_6h: 17x17x1024 -> `(batch, classes)`."""

  cfg: ConvConfig
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool):
    c = self.cfg
    y = nn.avg_pool(x, (5, 5), strides=(3, 3), padding='VALID')  # 5x5
    y = _cbn(c, 128, 1, 'Conv2d_1b_1x1')(y, train=train)
    # Like TF-slim, the kernel covers the whole remaining grid.
    y = _cbn(c, 768, y.shape[1:3], 'Conv2d_2a', 1, 'VALID')(y, train=train)
    y = y.reshape(y.shape[0], -1)
    y = nn.Dense(
        self.num_classes, kernel_init=_fc_init, dtype=c.dtype, name='Aux_logits'
    )(y)
    return y.astype(jnp.float32)


class Head(nn.Module):
  """Global average pool -> dropout (training only) -> fc, as TF-slim."""

  num_classes: int
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """`(batch, h, w, c)` -> `(batch, num_classes)` float32 logits."""
    y = jnp.mean(x, axis=(1, 2))
    if train and self.dropout_rate > 0:
      # Inverted dropout, so evaluation needs no rescaling and no rng.
      keep = jax.random.bernoulli(
          self.make_rng('dropout'), 1.0 - self.dropout_rate, y.shape
      )
      y = jnp.where(keep, y / (1.0 - self.dropout_rate), 0).astype(y.dtype)
    y = nn.Dense(
        self.num_classes, kernel_init=_fc_init, dtype=self.dtype, name='Logits'
    )(y)
    return y.astype(jnp.float32)


# Per block: its concatenation's parts in order, (producing conv or None for
# a max-pool pass-through, filters at width 1 or None), and the convs that
# read the block's input directly (a max pool is no conv).
_BLOCK_WIRING = {
    Mixed3a: (
        [(None, None), ('Branch_1_Conv2d_0a_3x3', 96)],
        ['Branch_1_Conv2d_0a_3x3'],
    ),
    Mixed4a: (
        [('Branch_0_Conv2d_1a_3x3', 96), ('Branch_1_Conv2d_1a_3x3', 96)],
        ['Branch_0_Conv2d_0a_1x1', 'Branch_1_Conv2d_0a_1x1'],
    ),
    Mixed5a: (
        [('Branch_0_Conv2d_1a_3x3', 192), (None, None)],
        ['Branch_0_Conv2d_1a_3x3'],
    ),
    InceptionA: (
        [
            ('Branch_0_Conv2d_0a_1x1', 96),
            ('Branch_1_Conv2d_0b_3x3', 96),
            ('Branch_2_Conv2d_0c_3x3', 96),
            ('Branch_3_Conv2d_0b_1x1', 96),
        ],
        [
            'Branch_0_Conv2d_0a_1x1',
            'Branch_1_Conv2d_0a_1x1',
            'Branch_2_Conv2d_0a_1x1',
            'Branch_3_Conv2d_0b_1x1',
        ],
    ),
    ReductionA: (
        [
            ('Branch_0_Conv2d_1a_3x3', 384),
            ('Branch_1_Conv2d_1a_3x3', 256),
            (None, None),
        ],
        ['Branch_0_Conv2d_1a_3x3', 'Branch_1_Conv2d_0a_1x1'],
    ),
    InceptionB: (
        [
            ('Branch_0_Conv2d_0a_1x1', 384),
            ('Branch_1_Conv2d_0c_7x1', 256),
            ('Branch_2_Conv2d_0e_1x7', 256),
            ('Branch_3_Conv2d_0b_1x1', 128),
        ],
        [
            'Branch_0_Conv2d_0a_1x1',
            'Branch_1_Conv2d_0a_1x1',
            'Branch_2_Conv2d_0a_1x1',
            'Branch_3_Conv2d_0b_1x1',
        ],
    ),
    ReductionB: (
        [
            ('Branch_0_Conv2d_1a_3x3', 192),
            ('Branch_1_Conv2d_1a_3x3', 320),
            (None, None),
        ],
        ['Branch_0_Conv2d_0a_1x1', 'Branch_1_Conv2d_0a_1x1'],
    ),
    InceptionC: (
        [
            ('Branch_0_Conv2d_0a_1x1', 256),
            ('Branch_1_Conv2d_0b_1x3', 256),
            ('Branch_1_Conv2d_0c_3x1', 256),
            ('Branch_2_Conv2d_0d_1x3', 256),
            ('Branch_2_Conv2d_0e_3x1', 256),
            ('Branch_3_Conv2d_0b_1x1', 256),
        ],
        [
            'Branch_0_Conv2d_0a_1x1',
            'Branch_1_Conv2d_0a_1x1',
            'Branch_2_Conv2d_0a_1x1',
            'Branch_3_Conv2d_0b_1x1',
        ],
    ),
}


class InceptionV4(nn.Module):
  """Inception-v4 for 299x299x3 images, gated at its 19 concatenations.

  Attributes:
    num_classes: classifier outputs (1000 for ImageNet; TF-slim's
      checkpoints use 1001 with a background class); None returns the pooled
      `(batch, 1536 * width)` features.
    dropout_rate: dropout before the fc in training (TF-slim keeps 0.8).
    aux_logits: build the auxiliary classifier on Mixed_6h; in training its
      logits come back in the extras as 'aux_logits'.
    width: multiplies every conv's filter count (1.0 is Inception-v4).
    bn_momentum, bn_epsilon, bn_scale: BN settings (TF-slim's defaults).
  """

  supports_local_gating: ClassVar[bool] = False
  local_gating: ClassVar[None] = None

  num_classes: Optional[int] = 1000
  dropout_rate: float = 0.2
  aux_logits: bool = False
  width: float = 1.0
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  bn_scale: bool = False
  dtype: Any = jnp.float32

  @property
  def _cfg(self) -> ConvConfig:
    return ConvConfig(
        self.width, self.bn_momentum, self.bn_epsilon, self.bn_scale, self.dtype
    )

  def gate_spec(self) -> GateSpec:
    """The 19 gated concatenations, in depth order (16,608 at width 1)."""
    ch = self._cfg.ch
    stem = (ch(64) + ch(96), 2 * ch(96), ch(192) + 2 * ch(96))
    a = 4 * ch(96)
    red_a = ch(384) + ch(256) + a  # the max pool passes A's channels
    b = ch(384) + 2 * ch(256) + ch(128)
    red_b = ch(192) + ch(320) + b  # the max pool passes B's channels
    c = 6 * ch(256)
    sizes = (
        stem
        + (a,) * len(A_SITES)
        + (red_a,)
        + (b,) * len(B_SITES)
        + (red_b,)
        + (c,) * len(C_SITES)
    )
    return GateSpec(tuple(zip(SITES, sizes)))

  def gate_wiring(self):
    """Per site, the convs its gates act on (for `gaternet_jax.macs`):
    `{site: (GateWire, ...)}`.

    A site's gates multiply its block's output concatenation, whose every
    branch ends in a ReLU, so a closed gate makes that channel exactly zero.
    'out': gates `[start, stop)` of the site switch off the output channels
    of the branch conv that produced that part of the concatenation (in the
    concatenation's order, `_BLOCK_WIRING`); a max-pool branch has no conv,
    so its part of the gates removes nothing there. 'in': the next block's
    convs that read the concatenation unchanged (each branch's first conv,
    the average-pool branch's 1x1 included, since a 3x3 average pool keeps
    a zero channel zero), or after Mixed_7d the `Logits` fc (global average
    pool, then fc), lose the closed channels as inputs.

    Not declared, so counted as if open (an overcount): a reduction's
    max-pool part carries the previous site's gated channels, which are
    also zero where that previous site's gate is closed (Mixed_5a <-
    Mixed_4a, Mixed_6a <- Mixed_5e, Mixed_7a <- Mixed_6h); the wiring gives
    each input channel one site, the reduction's own. Branch convs before a
    producer (e.g. a 1x1 reduce) whose whole output is closed are counted
    dense too. The auxiliary head, which also reads Mixed_6h, runs in
    training only and is not part of the (evaluation-mode) count.
    """
    spec = dict(self.gate_spec().sites)
    ch = self._cfg.ch
    blocks = (
        list(zip(STEM_SITES, (Mixed3a, Mixed4a, Mixed5a)))
        + [(n, InceptionA) for n in A_SITES]
        + [('Mixed_6a', ReductionA)]
        + [(n, InceptionB) for n in B_SITES]
        + [('Mixed_7a', ReductionB)]
        + [(n, InceptionC) for n in C_SITES]
    )
    assert tuple(n for n, _ in blocks) == SITES
    out = {}
    for i, (site, cls) in enumerate(blocks):
      producers, _ = _BLOCK_WIRING[cls]
      convs = sum(ch(f) for name, f in producers if name is not None)
      entries, start = [], 0
      for name, f in producers:
        # A pool branch passes the rest of the site through.
        width = ch(f) if name is not None else spec[site] - convs
        if name is not None:
          entries.append(
              GateWire((site, name, 'conv'), 'out', 0, start, start + width)
          )
        start += width
      assert start == spec[site], (site, start, spec[site])
      if i + 1 < len(blocks):
        nxt, nxt_cls = blocks[i + 1]
        entries += [
            GateWire((nxt, name, 'conv'), 'in')
            for name in _BLOCK_WIRING[nxt_cls][1]
        ]
      elif self.num_classes is not None:
        entries.append(GateWire(('Logits', 'Logits'), 'in'))
      out[site] = tuple(entries)
    return out

  @nn.compact
  def __call__(
      self, x: jax.Array, gates: Optional[Gates] = None, *, train: bool = False
  ) -> Tuple[jax.Array, Extras]:
    """`(batch, 299, 299, 3)` normalised images -> (`(batch, num_classes)`
    logits, extras) (`backbone.py`'s contract): the extras hold
    'aux_logits' in training with `aux_logits=True`, else nothing.

    `gates`, when given, maps every site of `gate_spec()` to a
    `(batch, filters)` array multiplying that concatenation's channels.
    """
    cfg = self._cfg

    def block(cls, name, y):
      gate = None if gates is None else gates[name]
      return cls(cfg, name=name)(y, gate, train=train)

    y = x.astype(self.dtype)
    y = _cbn(cfg, 32, 3, 'Conv2d_1a_3x3', 2, 'VALID')(y, train=train)  # 149
    y = _cbn(cfg, 32, 3, 'Conv2d_2a_3x3', 1, 'VALID')(y, train=train)  # 147
    y = _cbn(cfg, 64, 3, 'Conv2d_2b_3x3')(y, train=train)  # 147
    for cls, name in zip((Mixed3a, Mixed4a, Mixed5a), STEM_SITES):
      y = block(cls, name, y)  # 35
    for name in A_SITES:
      y = block(InceptionA, name, y)
    y = block(ReductionA, 'Mixed_6a', y)  # 17
    for name in B_SITES:
      y = block(InceptionB, name, y)
    # Built at init whatever `train` is, so that evaluation-mode init and
    # training share one parameter tree; evaluated only in training.
    extras = {}
    if (
        self.aux_logits
        and self.num_classes is not None
        and (train or self.is_initializing())
    ):
      aux = AuxHead(cfg, self.num_classes, name='AuxLogits')(y, train=train)
      if train:
        extras[AUX_LOGITS] = aux
    y = block(ReductionB, 'Mixed_7a', y)  # 8
    for name in C_SITES:
      y = block(InceptionC, name, y)
    if self.num_classes is None:
      return jnp.mean(y, axis=(1, 2)).astype(jnp.float32), extras
    return (
        Head(self.num_classes, self.dropout_rate, self.dtype, name='Logits')(
            y, train=train
        ),
        extras,
    )


def inception_v4(num_classes: Optional[int] = 1000, **kwargs) -> InceptionV4:
  """Registry factory: `inception_v4(num_classes=..., dtype=..., **config)`."""
  width = float(kwargs.get('width', 1.0))
  if width <= 0:
    raise ValueError(f'inception_v4 width must be positive; got {width}.')
  rate = float(kwargs.get('dropout_rate', 0.2))
  if not 0.0 <= rate < 1.0:
    raise ValueError(
        f'inception_v4 dropout_rate must be in [0, 1); got ' f'{rate}.'
    )
  return InceptionV4(num_classes=num_classes, **kwargs)
