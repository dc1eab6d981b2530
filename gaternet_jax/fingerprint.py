"""What a run's checkpoints depend on, as the model and dataset say it.

A workdir may be resumed (or serve as a pretraining stage) only by a config
that builds the same network on the same dataset. Instead of comparing
config dicts, which would need every new field mirrored into a list of what
matters, the model describes itself: its gating method, its gate spec's
sites and the shapes and dtypes of its variables (`jax.eval_shape` of
`model.init`: traced, never computed, so cheap even for ResNet-152). The
dataset is its name, image shape and number of classes
(`data.dataset_info`, which loads nothing). A field that builds nothing (an
unused gater, `se_reduction=0`) or changes no shape (the compute dtype,
SemHash's noise, gate dropout, augmentation, batch sizes, where the data
lives) leaves the fingerprint as it is: a checkpoint restores either way.

    fingerprint(config)  ->  {'model': {...}, 'data': {...}}  (JSON-able)
    difference(config, stored_config_json)  ->  (part, why) or None
"""

from __future__ import annotations

import copy
import json
from typing import Any, Dict, Optional, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from gaternet_jax import data as data_lib
from gaternet_jax import datasets
from gaternet_jax import gating
from gaternet_jax import paths
from gaternet_jax.errors import DataError, WorkdirError
from gaternet_jax.models import create_model

# The variable collections a checkpoint holds (steps.TrainState).
_COLLECTIONS = ('params', 'batch_stats')


def data_fingerprint(
    data_cfg: ml_collections.ConfigDict, dataset: Any = None
) -> Dict[str, Any]:
  """`{'name', 'image_shape', 'num_classes'}` of `data_cfg`'s dataset: of
  `dataset` where one is already loaded, else as `data.dataset_info` says.
  Fields `data_cfg` leaves out take their datasets.DATA_DEFAULTS value."""
  data_cfg = datasets.data_config(data_cfg)
  if dataset is not None:
    image_shape, num_classes = dataset.image_shape, dataset.num_classes
  else:
    image_shape, num_classes = data_lib.dataset_info(data_cfg)
  return {
      'name': data_cfg.name,
      'image_shape': [int(n) for n in image_shape],
      'num_classes': int(num_classes),
  }


def model_fingerprint(
    model_cfg: ml_collections.ConfigDict, image_shape, num_classes: int
) -> Dict[str, Any]:
  """The network `model_cfg` builds for `(height, width, channels)` images
  of `num_classes` classes.

  Returns:
    {'gating': the method, 'gate_sites': [[name, filters], ...],
     'variables': {'params/backbone/.../kernel': [shape, dtype], ...}}.
  """
  key = (
      json.dumps(model_cfg.to_dict(), sort_keys=True, default=str),
      tuple(int(n) for n in image_shape),
      int(num_classes),
  )
  if key not in _MODEL_FINGERPRINTS:
    _MODEL_FINGERPRINTS[key] = _trace_model(model_cfg, image_shape, num_classes)
  return copy.deepcopy(_MODEL_FINGERPRINTS[key])


# A process checks the same network more than once (its config before any
# data loads, then against a workdir's): each is traced once.
_MODEL_FINGERPRINTS: Dict[Tuple[str, Tuple[int, ...], int], Dict[str, Any]] = {}


def _trace_model(
    model_cfg: ml_collections.ConfigDict, image_shape, num_classes: int
) -> Dict[str, Any]:
  model = create_model(model_cfg, num_classes)
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  rngs = {'params': jax.random.key(0), 'gates': jax.random.key(1)}
  variables = jax.eval_shape(
      lambda r, x: model.init(r, x, train=False), rngs, x
  )
  flat = traverse_util.flatten_dict(
      {k: dict(variables[k]) for k in _COLLECTIONS if k in variables}, sep='/'
  )
  return {
      'gating': model.gating,
      'gate_sites': [[name, int(n)] for name, n in model.gate_spec()],
      'variables': {
          path: [list(v.shape), str(v.dtype)]
          for path, v in sorted(flat.items())
      },
  }


def fingerprint(
    config: ml_collections.ConfigDict, dataset: Any = None
) -> Dict[str, Any]:
  """`{'model': model_fingerprint(...), 'data': data_fingerprint(...)}` of
  an experiment config (on `dataset` if given), its model built for its
  dataset."""
  data = data_fingerprint(config.data, dataset)
  return {
      'model': model_fingerprint(
          config.model, data['image_shape'], data['num_classes']
      ),
      'data': data,
  }


def _as_config(value: Any) -> Any:
  """A config.json value as a config file writes it (JSON has no tuples)."""
  if isinstance(value, dict):
    return {k: _as_config(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_config(v) for v in value)
  return value


def stored_model_config(
    stored: Dict[str, Any], config: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
  """The `model` config of a workdir's config.json, in today's terms.

  An older version's fields are upgraded (gating.upgrade_model_dict); a
  top-level model field it did not write yet (say `dtype`) is taken from
  `config`. Sections it did write are kept whole, so a backbone option it
  left out builds its factory's default, not `config`'s value.
  """
  model = gating.upgrade_model_dict(_as_config(stored.get('model', {})))
  merged = config.model.to_dict()
  merged.update(model)
  return ml_collections.ConfigDict(merged)


def _first_difference(old: Dict[str, Any], new: Dict[str, Any]) -> str:
  """Where the stored run's model fingerprint `old` first differs from
  `new`, in a few words."""
  if old['gating'] != new['gating']:
    return f"its gating is {old['gating']!r}, this config's {new['gating']!r}"
  old_sites, new_sites = dict(old['gate_sites']), dict(new['gate_sites'])
  for site in list(old_sites) + [s for s in new_sites if s not in old_sites]:
    was, now = old_sites.get(site), new_sites.get(site)
    if was != now:
      return (
          f"its gate site {site} has {was or 'no'} filters, this "
          f"config's {now or 'no'}"
      )
  for path in sorted(set(old['variables']) | set(new['variables'])):
    was, now = old['variables'].get(path), new['variables'].get(path)
    if was != now:
      return f"its {path} is {_variable(was)}, this config's {_variable(now)}"
  return 'its network is another'


def _variable(entry: Optional[list]) -> str:
  return 'absent' if entry is None else f'{tuple(entry[0])} {entry[1]}'


def difference(
    config: ml_collections.ConfigDict,
    stored: Dict[str, Any],
    dataset: Any = None,
) -> Optional[Tuple[str, str]]:
  """Whether a workdir's run (its config.json, `stored`) differs from
  `config`'s (on `dataset`, if one is already loaded) in what its
  checkpoints depend on.

  The stored model is built for `config`'s dataset, so that a change of
  dataset is reported as one of `data`, not of `model`. A stored dataset
  that only a loaded one can be (a name `data.dataset_info` does not know)
  is taken as `dataset` if it has the same name: config.json records no
  more of it.

  Returns:
    None if both build the same network on the same dataset, else
    `('model' or 'data', a few words on what differs)`.
  """
  new = fingerprint(config, dataset)
  shape, classes = new['data']['image_shape'], new['data']['num_classes']
  try:
    old_model = model_fingerprint(
        stored_model_config(stored, config), shape, classes
    )
  except (TypeError, ValueError) as e:  # UserErrors are ValueErrors.
    # Today's code cannot build it: a network of another version.
    return 'model', f"its model does not build here: {str(e).rstrip('.')}"
  if old_model != new['model']:
    return 'model', _first_difference(old_model, new['model'])
  # A workdir's config may hold data fields of an older version; the
  # fingerprint reads only today's.
  old_data_cfg = datasets.data_config(
      {
          k: v
          for k, v in _as_config(stored.get('data', {})).items()
          if k in datasets.DATA_DEFAULTS
      }
  )
  try:
    old_data = data_fingerprint(old_data_cfg)
  except DataError as e:
    if dataset is None or old_data_cfg.name != new['data']['name']:
      return 'data', f"its dataset is unknown here: {str(e).rstrip('.')}"
    old_data = data_fingerprint(old_data_cfg, dataset)
  if old_data != new['data']:
    return 'data', (
        f"its dataset is {old_data['name']}, "
        f"{tuple(old_data['image_shape'])} images of "
        f"{old_data['num_classes']} classes"
    )
  return None


def check_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Any = None,
):
  """Refuses a workdir whose run built another network or read another
  dataset than `config` (on `dataset`, if given): its checkpoints are not
  this config's to resume, evaluate or analyse.

  Raises:
    WorkdirError: naming what differs.
  """
  path = paths.join(workdir, 'config.json')
  if not paths.resolve(path).exists():
    return
  differs = difference(config, paths.read_json(path, "run's config"), dataset)
  if differs:
    key, why = differs
    raise WorkdirError(
        f'{workdir} holds a run with a different `{key}` config ({why}); '
        f'use its own config ({path}) or choose another --workdir.'
    )
