"""What a run resumed from its workdir must share with the run that wrote it.

fingerprint.py refuses a config that builds another network or reads
another dataset: its checkpoints would not restore. This file refuses the
subtler case, a config that restores fine but would train on another
trajectory (another batch size, seed, schedule, loss or data pipeline), so
that a workdir never holds a run mixed from two configs unless the user
asks for it (`--allow_config_change`).

Every config field counts, except those that only say how the run is
watched, stored or evaluated (`UNTRACKED`): new fields are covered without
a list to keep up to date. A field one side lacks (a config.json written by
an older version) is not compared.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from absl import logging
import jax
import ml_collections

from gaternet_jax import paths
from gaternet_jax.errors import WorkdirError

# Fields (and sections) a resumed run may change: they leave the weights of
# every step as they are.
UNTRACKED = (
    'log_every_steps',
    'eval_every_epochs',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'progress_every_secs',
    'tensorboard',
    'eval_batch_size',
    'steps_per_call',  # on-device steps per call: the same steps
    'benchmark',
    'analysis',
    'compact',
    'speed',
    'data.data_dir',  # where the same files are
    'data.cache',  # how fast they are read
    'data.prefetch',
    'data.num_parallel_calls',
)


def _flatten(tree: Any, prefix: str = '') -> Dict[str, Any]:
  """{'optimizer.learning_rate': 0.1, ...}; lists and tuples are leaves."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
  return out


def _normal(value: Any) -> Any:
  """A value as config.json holds it (tuples are lists, 2 == 2.0)."""
  if isinstance(value, (list, tuple)):
    return [_normal(v) for v in value]
  if isinstance(value, float) and value.is_integer():
    return int(value)
  return value


def as_json(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """`config` as its workdir's config.json holds it."""
  return json.loads(config.to_json_best_effort())


def _untracked(field: str) -> bool:
  return any(field == u or field.startswith(u + '.') for u in UNTRACKED)


def changed_fields(
    config: ml_collections.ConfigDict, stored: Dict[str, Any]
) -> List[Tuple[str, Any, Any]]:
  """`(field, stored value, config's value)` of each field that changes the
  training trajectory, sorted by field."""
  new = _flatten(as_json(config))
  old = _flatten(stored)
  changed = []
  for field in sorted(set(new) & set(old)):
    if _untracked(field):
      continue
    if _normal(new[field]) != _normal(old[field]):
      changed.append((field, old[field], new[field]))
  return changed


def _describe(changed: List[Tuple[str, Any, Any]], limit: int = 6) -> str:
  shown = ', '.join(
      f'{f} {old!r} -> {new!r}' for f, old, new in changed[:limit]
  )
  if len(changed) > limit:
    shown += f' and {len(changed) - limit} more'
  return shown


def check(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int,
    allow_change: bool = False,
):
  """Refuses to resume `workdir` at `step` with a config that changes its
  training trajectory, unless `allow_change`; then the old config.json is
  kept as `config.before_step_<step>.json` and the new one written.

  Raises:
    WorkdirError: naming the fields that differ and the ways on.
  """
  path = paths.join(workdir, 'config.json')
  if not paths.resolve(path).exists():
    return
  stored = paths.read_json(path, "run's config")
  changed = changed_fields(config, stored)
  if not changed:
    return
  if not allow_change:
    raise WorkdirError(
        f'{workdir} holds a run at step {step} trained with other values of '
        f'{_describe(changed)}; resume it with its own config ({path}), '
        f'pass --allow_config_change to go on with these, or choose a new '
        f'--workdir.'
    )
  kept = paths.join(workdir, f'config.before_step_{step}.json')
  if jax.process_index() == 0:
    paths.write_json(kept, stored)
    paths.write_json(path, as_json(config))
  logging.warning(
      '%s: resuming at step %d with a changed config (%s), as '
      '--allow_config_change says; the old one is kept in %s.',
      workdir,
      step,
      _describe(changed),
      kept,
  )
