"""GaterNet's training recipe (section 3.3): pretrain, then train jointly.

The backbone is initialised from a trained baseline, and the gater's feature
extractor from a trained classifier of the gater's architecture. When both
are the same network on the same data (ResNet-20 on CIFAR), one baseline run
serves both. A stage whose workdir the config names is only loaded; a stage
without one is trained (or resumed) under `<workdir>/pretrain/<stage>`, so a
single command runs the whole chain.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Tuple

import flax
import ml_collections

from gaternet_jax import checkpoints
from gaternet_jax import gating
from gaternet_jax import paths
from gaternet_jax.errors import ConfigError
from gaternet_jax.models import GATER_FIELDS


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  config: ml_collections.ConfigDict
  workdir: str
  targets: Tuple[str, ...]  # 'backbone' and/or 'gater'
  train: bool


def _arch(cfg: ml_collections.ConfigDict) -> dict:
  d = {k: v for k, v in cfg.to_dict().items() if k not in GATER_FIELDS}
  if not d.get('se_reduction'):
    d.pop('se_reduction', None)
  return d


def stage_config(
    config: ml_collections.ConfigDict, arch: dict, gater_only: bool = False
) -> ml_collections.ConfigDict:
  """The ungated classifier run that pretrains a part of `config`'s model:
  `config` with `arch` as its network and `pretrain.overrides` applied, then
  `pretrain.gater_overrides` for a run that pretrains the gater alone."""
  c = gating.ungated(config)
  c.model.backbone = ml_collections.ConfigDict(arch)
  fields = ['overrides'] + (['gater_overrides'] if gater_only else [])
  for field in fields:
    for key, value in config.pretrain[field].to_dict().items():
      if key not in c:
        raise ConfigError(f'pretrain.{field}.{key} is not a config field.')
      if isinstance(value, dict):
        c[key].update(value)
      else:
        c[key] = value
  return c


def pretraining_stages(
    config: ml_collections.ConfigDict, workdir: str
) -> List[Stage]:
  """The stages a gated config needs before joint training (may be none)."""
  if gating.method(config) != gating.GATER or not config.pretrain.enabled:
    return []
  if official_checkpoint(config):
    return []  # The imported checkpoint is already trained.
  pre = config.pretrain
  backbone_arch = _arch(config.model.backbone)
  gater_arch = _arch(config.model.gater)
  default = lambda name: paths.join(workdir, 'pretrain', name)
  if backbone_arch == gater_arch and pre.backbone_workdir == pre.gater_workdir:
    wd = pre.backbone_workdir or default('baseline')
    return [
        Stage(
            'baseline',
            stage_config(config, backbone_arch),
            wd,
            ('backbone', 'gater'),
            train=not pre.backbone_workdir,
        )
    ]
  return [
      Stage(
          'backbone',
          stage_config(config, backbone_arch),
          pre.backbone_workdir or default('backbone'),
          ('backbone',),
          train=not pre.backbone_workdir,
      ),
      Stage(
          'gater',
          stage_config(config, gater_arch, gater_only=True),
          pre.gater_workdir or default('gater'),
          ('gater',),
          train=not pre.gater_workdir,
      ),
  ]


def stage_init(stage: Stage) -> Callable:
  """A function copying the stage's trained weights into a train state."""

  def init(state):
    pre = checkpoints.load_variables(stage.workdir)
    params, stats = state.params, state.batch_stats
    net, net_stats = pre['params']['backbone'], pre['batch_stats']['backbone']
    if 'backbone' in stage.targets:
      params = checkpoints.graft(
          params, ('backbone',), net, f'backbone from {stage.workdir}'
      )
      stats = checkpoints.graft(
          stats,
          ('backbone',),
          net_stats,
          f'backbone statistics from {stage.workdir}',
      )
    if 'gater' in stage.targets:
      features = {k: v for k, v in net.items() if k != 'fc'}
      params = checkpoints.graft(
          params,
          ('gater', 'features'),
          features,
          f'gater features from {stage.workdir}',
      )
      stats = checkpoints.graft(
          stats,
          ('gater', 'features'),
          net_stats,
          f'gater statistics from {stage.workdir}',
      )
    return state.replace(
        params=flax.core.freeze(params)
        if isinstance(state.params, flax.core.FrozenDict)
        else params,
        batch_stats=stats,
    )

  return init


def official_checkpoint(config: ml_collections.ConfigDict) -> str:
  return config.init.official_checkpoint or ''


def official_init(config: ml_collections.ConfigDict) -> Callable:
  """Initialises from an official PyTorch GaterNet checkpoint."""

  def init(state):
    from gaternet_jax import convert  # pylint: disable=g-import-not-at-top

    _, variables = convert.load_official_checkpoint(
        official_checkpoint(config), backbone_depth=config.model.backbone.depth
    )
    params = checkpoints.graft(
        {'root': state.params},
        ('root',),
        variables['params'],
        'official checkpoint',
    )
    stats = checkpoints.graft(
        {'root': state.batch_stats},
        ('root',),
        variables['batch_stats'],
        'official checkpoint statistics',
    )
    return state.replace(params=params['root'], batch_stats=stats['root'])

  return init
