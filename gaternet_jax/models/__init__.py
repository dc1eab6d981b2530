"""Model registry: backbones by name, and `create_model(config.model)`."""

from __future__ import annotations

from typing import Callable, Dict

import jax.numpy as jnp
import ml_collections

from gaternet_jax import gating
from gaternet_jax.errors import ConfigError
from gaternet_jax.gates import BINARIZE_RULES
from gaternet_jax.models.backbone import Backbone, GateWire
from gaternet_jax.models.compaction import Compaction
from gaternet_jax.models.densenet import densenet_bc
from gaternet_jax.models.gaternet import Gater, GaterNet
from gaternet_jax.models import inception_v4 as _inception_v4_lib
from gaternet_jax.models.layers import LocalGating
from gaternet_jax.models.resnet import ResNet
from gaternet_jax.models.resnet_cifar import cifar_preact_resnet, cifar_resnet
from gaternet_jax.models.resnet_imagenet import imagenet_resnet
from gaternet_jax.models.segmentation import SegmentationHead
from gaternet_jax.models.shakeshake import shake_shake

# name -> factory(num_classes=..., dtype=..., **config kwargs) -> a
# `backbone.Backbone`.
BACKBONES: Dict[str, Callable[..., Backbone]] = {
    'cifar_resnet': cifar_resnet,
    'cifar_preact_resnet': cifar_preact_resnet,
    'imagenet_resnet': imagenet_resnet,
    'densenet_bc': densenet_bc,
    'shake_shake': shake_shake,
    'inception_v4': _inception_v4_lib.inception_v4,
}

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Fields of `config.model.gater` that belong to the Gater, not its features.
GATER_FIELDS = ('bottleneck', 'batchnorm')


def _build(cfg: ml_collections.ConfigDict, num_classes, dtype, **extra):
  kwargs = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg, **extra)
  name = kwargs.pop('name')
  if name not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}.')
  for k in GATER_FIELDS:
    kwargs.pop(k, None)
  return BACKBONES[name](num_classes=num_classes, dtype=dtype, **kwargs)


def _supports_local_gating(factory: Callable[..., Backbone]) -> bool:
  """Whether the backbones a registry factory builds can gate themselves."""
  return factory(num_classes=None).supports_local_gating


def create_model(
    model_cfg: ml_collections.ConfigDict, num_classes: int
) -> GaterNet:
  """Builds `model_cfg`'s model for its gating method (`model_cfg.gating`).

  `model_cfg.backbone` and `model_cfg.gater` each hold a registry `name` and
  that factory's keyword arguments; the gater's output size comes from the
  backbone's gate spec. 'none' builds the backbone alone, 'gater' adds the
  gater, 'local' builds the backbone with `model_cfg.local_gating`'s gating
  modules in its units.
  """
  method = gating.method(model_cfg)
  dtype = _DTYPES[model_cfg.dtype]
  if model_cfg.semhash.binarize not in BINARIZE_RULES:
    raise ConfigError(
        f'model.semhash.binarize must be one of '
        f'{", ".join(map(repr, BINARIZE_RULES))}; got '
        f'{model_cfg.semhash.binarize!r}.'
    )
  try:
    backbone = _build(model_cfg.backbone, num_classes, dtype)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'model.backbone: {e}') from None
  assert isinstance(backbone, Backbone), type(backbone)
  if method == gating.LOCAL:
    if not backbone.supports_local_gating:
      local_ok = [
          name
          for name, factory in BACKBONES.items()
          if _supports_local_gating(factory)
      ]
      raise ConfigError(
          f"model.gating='local' (batch-shaping) works with "
          f'{", ".join(local_ok)}; not with '
          f'{model_cfg.backbone.name!r}.'
      )
    try:
      local = LocalGating(**model_cfg.local_gating.to_dict())
    except (TypeError, ValueError) as e:
      raise ConfigError(
          f'model.{e}'
          if str(e).startswith('local_gating')
          else f'model.local_gating: {e}'
      ) from None
    backbone = backbone.clone(local_gating=local)
  backbone = _segmentation(model_cfg, backbone)
  num_gates = backbone.gate_spec().total
  compaction = _compaction(model_cfg, backbone, method)
  if compaction is not None:
    backbone = backbone.clone(compaction=compaction)
  gater = None
  if method == gating.GATER:
    features = _build(model_cfg.gater, None, dtype)
    gater = Gater(
        features=features,
        num_gates=num_gates,
        bottleneck=model_cfg.gater.bottleneck,
        batchnorm=model_cfg.gater.batchnorm,
        dtype=dtype,
    )
  return GaterNet(
      backbone=backbone,
      gater=gater,
      mix_prob=model_cfg.semhash.mix_prob,
      noise_std=model_cfg.semhash.noise_std,
      binarize=model_cfg.semhash.binarize,
      compaction=compaction,
  )


def _segmentation(model_cfg, backbone):
  """`backbone` as the encoder of `model_cfg.segmentation`'s network (when
  enabled): an output stride and a context head."""
  seg = model_cfg.get('segmentation')
  if seg is None or not seg.enabled:
    return backbone
  if not isinstance(backbone, ResNet):
    raise ConfigError(
        'model.segmentation works with the ResNet backbones (cifar_resnet, '
        'cifar_preact_resnet, imagenet_resnet) as encoders; not '
        f'{model_cfg.backbone.name!r}.'
    )
  stride = seg.output_stride
  if stride not in (8, 16) and not (
      isinstance(stride, int) and stride >= 4 and stride & (stride - 1) == 0
  ):
    raise ConfigError(
        'model.segmentation.output_stride must be a power of 2 (8 or 16 '
        f'in the papers); got {stride!r}.'
    )
  if stride < backbone.stem_stride():
    raise ConfigError(
        f'model.segmentation.output_stride={stride} is below the stride '
        f'{backbone.stem_stride()} of the {model_cfg.backbone.name} stem.'
    )
  try:
    head = SegmentationHead(
        kind=seg.head,
        width=seg.head_width,
        rates=tuple(seg.aspp_rates),
        bins=tuple(seg.psp_bins),
        dropout=seg.dropout,
        gated=bool(seg.gate_head),
    )
  except (TypeError, ValueError) as e:
    raise ConfigError(f'model.{e}') from None
  return backbone.clone(output_stride=int(stride), head=head)


def _compaction(model_cfg, backbone, method: str) -> Compaction | None:
  """`model_cfg.compaction` parsed and checked against the backbone."""
  try:
    compaction = Compaction.parse(model_cfg.get('compaction', ''))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if compaction is None:
    return None
  if method == gating.NONE:
    raise ConfigError(
        "model.compaction is set but model.gating='none': a compacted "
        'model comes from a gated one.'
    )
  if isinstance(backbone, ResNet) and backbone.head is not None:
    raise ConfigError(
        'model.compaction works with classification ResNets; this one has a '
        'segmentation head (model.segmentation.enabled).'
    )
  if not isinstance(backbone, ResNet) or backbone.se_reduction:
    raise ConfigError(
        'model.compaction works with the ResNet backbones (cifar_resnet, '
        'cifar_preact_resnet, imagenet_resnet) without squeeze-and-'
        f'excitation; not {model_cfg.backbone.name!r}'
        + (
            f' with se_reduction={backbone.se_reduction}'
            if isinstance(backbone, ResNet)
            else ''
        )
        + '.'
    )
  try:
    compaction.check(backbone.gate_spec())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return compaction


__all__ = [
    'BACKBONES',
    'GATER_FIELDS',
    'Backbone',
    'GateWire',
    'Gater',
    'GaterNet',
    'ResNet',
    'create_model',
    'cifar_resnet',
    'cifar_preact_resnet',
]
