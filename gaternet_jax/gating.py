"""Which gating method a run uses: the one place that decides it.

A config names its method in `config.model.gating`:

  'none'   the plain backbone, the baseline of the other two;
  'gater'  GaterNet (Chen et al. 2019): a gater network looks at the image
           and emits the gates of the whole backbone (`config.model.gater`);
  'local'  batch-shaping (Bejnordi et al. 2020): every residual unit gates
           its own channels (`config.model.local_gating`).

`method(config)` reads and checks the field; a built model says the same
through its `gating` property. Model construction, the recipe, the losses,
summary, benchmark, analysis and the workdir check all ask one of the two,
and `ungated(config)` derives the baseline of any config.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gaternet_jax.errors import ConfigError

NONE = 'none'
GATER = 'gater'
LOCAL = 'local'
METHODS = (NONE, GATER, LOCAL)


def check(value: Any, field: str = 'model.gating') -> str:
  """`value` if it names a method, else a ConfigError naming the field."""
  if value not in METHODS:
    raise ConfigError(
        f'{field} must be one of {", ".join(map(repr, METHODS))}'
        f'; got {value!r}.'
    )
  return value


def method(config: ml_collections.ConfigDict) -> str:
  """The gating method of an experiment config (or of its `model` part)."""
  model_cfg = config.model if 'model' in config else config
  if 'gated' in model_cfg:
    raise ConfigError(
        "model.gated was replaced by model.gating: 'gater' for "
        "GaterNet, 'none' for the baseline."
    )
  if 'local_gating' in model_cfg.backbone:
    raise ConfigError(
        'model.backbone.local_gating was replaced by '
        "model.gating='local' and model.local_gating."
    )
  return check(model_cfg.gating)


def is_gated(config: ml_collections.ConfigDict) -> bool:
  """Whether the config's model has gates (a gater or local gates)."""
  return method(config) != NONE


def gate_losses_enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the config trains with batch-shaping and/or L0 (local gates'
  losses)."""
  bas, l0 = config.batch_shaping, config.l0
  return bas.weight > 0 or bas.final_weight > 0 or l0.weight > 0


def ungated(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The baseline of `config`: the same backbone, data and training scheme
  with no gates, none of the gates' losses, and nothing to pretrain or
  import (an ungated run trains its backbone from scratch)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.gating = NONE
  c.model.gate_dropout = 0.0
  c.gate_l1_weight = 0.0
  c.batch_shaping.weight = 0.0
  c.batch_shaping.final_weight = 0.0
  c.l0.weight = 0.0
  c.pretrain.enabled = False
  c.init.official_checkpoint = ''
  return c


def upgrade_model_dict(model: dict) -> dict:
  """A `model` config dict as this version writes it, from one an older
  version wrote (in a workdir's config.json): `gated` (True/False) and
  `backbone.local_gating` became `gating` and `local_gating`, and SemHash
  binarised the paper's way."""
  model = dict(model)
  if 'gating' in model:
    return model
  backbone = dict(model.get('backbone', {}))
  local = dict(backbone.pop('local_gating', None) or {})
  if local.pop('enabled', True) and local:
    model['gating'] = LOCAL
    model['local_gating'] = local
  else:
    model['gating'] = GATER if model.get('gated') else NONE
  model.pop('gated', None)
  model['backbone'] = backbone
  if 'semhash' in model:
    model['semhash'] = dict(model['semhash'], binarize='paper')
  return model
