"""CIFAR ResNets that accept a gate PyTree (presets of resnet.py's `ResNet`).

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

from typing import Optional, Sequence

from gaternet_jax.models.layers import parse_local_gating
from gaternet_jax.models.resnet import BasicBlock, PreActBottleneck, ResNet

# The CIFAR family is resnet.py's ResNet with the 3x3 stem.
CifarResNet = ResNet


def cifar_resnet(
    depth: int = 20,
    widths: Sequence[int] = (16, 32, 64),
    stem_width: Optional[int] = None,
    **kwargs,
) -> ResNet:
  """Basic-block CIFAR ResNet of depth 6n+2."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f'cifar_resnet depth must be 6n+2 (8, 20, 32, 44, 56, '
        f'110, ...); got {depth}.'
    )
  n = (depth - 2) // 6
  widths = tuple(int(w) for w in widths)
  kwargs['local_gating'] = parse_local_gating(kwargs.get('local_gating'))
  return ResNet(
      stage_sizes=(n, n, n),
      widths=widths,
      block_cls=BasicBlock,
      stem='cifar',
      stem_width=stem_width or widths[0],
      **kwargs,
  )


def cifar_preact_resnet(
    depth: int = 164,
    widths: Sequence[Sequence[int]] = ((4, 16), (32, 128), (64, 256)),
    stem_width: int = 16,
    **kwargs,
) -> ResNet:
  """Pre-activation bottleneck CIFAR ResNet of depth 9n+2 (ResNet-164)."""
  if depth < 11 or (depth - 2) % 9:
    raise ValueError(
        f'cifar_preact_resnet depth must be 9n+2 (164 = 9*18+2);'
        f' got {depth}.'
    )
  n = (depth - 2) // 9
  widths = tuple(tuple(int(v) for v in w) for w in widths)
  kwargs['local_gating'] = parse_local_gating(kwargs.get('local_gating'))
  return ResNet(
      stage_sizes=(n, n, n),
      widths=widths,
      block_cls=PreActBottleneck,
      stem='cifar',
      stem_width=stem_width,
      **kwargs,
  )
