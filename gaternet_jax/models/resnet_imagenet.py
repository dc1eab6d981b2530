"""ImageNet ResNets that accept a gate PyTree (GaterNet's Table 3 backbones;
presets of resnet.py's `ResNet`).

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

import jax.numpy as jnp

from gaternet_jax.models.layers import parse_local_gating
from gaternet_jax.models.resnet import EXPANSION, BasicBlock, Bottleneck, ResNet

# The ImageNet family is resnet.py's ResNet with the 7x7/2 stem.
ImageNetResNet = ResNet

# depth -> (unit class, residual units per stage).
DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

STANDARD_WIDTHS = (64, 128, 256, 512)

__all__ = [
    'DEPTHS',
    'EXPANSION',
    'STANDARD_WIDTHS',
    'ImageNetResNet',
    'imagenet_resnet',
]


def imagenet_resnet(
    depth: int = 50,
    widths: Sequence[int] = STANDARD_WIDTHS,
    se_reduction: int = 0,
    num_classes: Optional[int] = 1000,
    dtype: Any = jnp.float32,
    stem_width: Optional[int] = None,
    local_gating: Any = None,
) -> ResNet:
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
    raise ValueError(
        f'imagenet_resnet depth must be one of '
        f'{sorted(DEPTHS)}; got {depth}.'
    )
  widths = tuple(int(w) for w in widths)
  if len(widths) != 4:
    raise ValueError(f'imagenet_resnet needs 4 stage widths; got {widths}.')
  block_cls, stage_sizes = DEPTHS[depth]
  return ResNet(
      stage_sizes=stage_sizes,
      widths=widths,
      block_cls=block_cls,
      stem='imagenet',
      stem_width=stem_width,
      num_classes=num_classes,
      se_reduction=se_reduction,
      dtype=dtype,
      local_gating=parse_local_gating(local_gating),
  )
