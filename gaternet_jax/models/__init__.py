"""Model registry: backbones by name, and `create_model(config.model)`."""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax.numpy as jnp
import ml_collections

from gaternet_jax.errors import ConfigError
from gaternet_jax.models.densenet import densenet_bc
from gaternet_jax.models.gaternet import Gater, GaterNet
from gaternet_jax.models import inception_v4 as _inception_v4_lib
from gaternet_jax.models.resnet_cifar import (CifarResNet, cifar_preact_resnet,
                                              cifar_resnet)
from gaternet_jax.models.resnet_imagenet import imagenet_resnet
from gaternet_jax.models.shakeshake import shake_shake

# name -> factory(num_classes=..., dtype=..., **config kwargs) -> module with
# gate_spec() and __call__(x, gates, train=).
BACKBONES: Dict[str, Callable[..., Any]] = {
    'cifar_resnet': cifar_resnet,
    'cifar_preact_resnet': cifar_preact_resnet,
    'imagenet_resnet': imagenet_resnet,
    'densenet_bc': densenet_bc,
    'shake_shake': shake_shake,
    'inception_v4': _inception_v4_lib.inception_v4,
}

# Backbones whose residual units can gate themselves (batch-shaping).
LOCALLY_GATED = ('cifar_resnet', 'cifar_preact_resnet', 'imagenet_resnet')

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Fields of `config.model.gater` that belong to the Gater, not its features.
GATER_FIELDS = ('bottleneck', 'batchnorm')


def _build(cfg: ml_collections.ConfigDict, num_classes, dtype):
  kwargs = dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg)
  name = kwargs.pop('name')
  if name not in BACKBONES:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}.')
  for k in GATER_FIELDS:
    kwargs.pop(k, None)
  return BACKBONES[name](num_classes=num_classes, dtype=dtype, **kwargs)


def create_model(model_cfg: ml_collections.ConfigDict,
                 num_classes: int) -> GaterNet:
  """Builds the GaterNet (or the baseline when `model_cfg.gated` is False).

  `model_cfg.backbone` and `model_cfg.gater` each hold a registry `name` and
  that factory's keyword arguments; the gater's output size comes from the
  backbone's gate spec.
  """
  dtype = _DTYPES[model_cfg.get('dtype', 'float32')]
  local = model_cfg.backbone.get('local_gating')
  if local and model_cfg.backbone.name not in LOCALLY_GATED:
    raise ConfigError(f'model.backbone.local_gating (batch-shaping) works with '
                      f'{", ".join(LOCALLY_GATED)}; not with '
                      f'{model_cfg.backbone.name!r}.')
  if local and model_cfg.gated:
    raise ConfigError('model.gated (a GaterNet gater) and '
                      'model.backbone.local_gating (batch-shaping) exclude '
                      'each other; set one.')
  try:
    backbone = _build(model_cfg.backbone, num_classes, dtype)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'model.backbone: {e}') from None
  gater = None
  if model_cfg.gated:
    features = _build(model_cfg.gater, None, dtype)
    gater = Gater(features=features, num_gates=backbone.gate_spec().total,
                  bottleneck=model_cfg.gater.bottleneck,
                  batchnorm=model_cfg.gater.batchnorm, dtype=dtype)
  return GaterNet(backbone=backbone, gater=gater,
                  mix_prob=model_cfg.semhash.mix_prob,
                  noise_std=model_cfg.semhash.noise_std)


__all__ = ['BACKBONES', 'GATER_FIELDS', 'CifarResNet', 'Gater', 'GaterNet', 'create_model',
           'cifar_resnet', 'cifar_preact_resnet']
