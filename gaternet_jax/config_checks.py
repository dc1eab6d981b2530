"""Config values that cannot work, refused before anything loads or runs.

`check(config, mode)` reads the fields that `mode` uses (cli.MODES) and
raises a ConfigError for the first one out of range, naming the field, its
value and what is allowed: a batch of 0, a learning rate of 0, a run of 0
epochs or steps, a negative loss weight. A training run checks its
pretraining stages too (gaternet_jax/recipe.py), whose fields
`pretrain.overrides` and `pretrain.gater_overrides` change. What needs the
data or the devices (a batch larger than the dataset, or one the devices
do not divide) is checked where those are known.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import ml_collections

from gaternet_jax.errors import ConfigError, UserError

# main.py's modes (cli.MODES); the rules say what each reads.
MODES = (
    'train',
    'eval',
    'summary',
    'benchmark',
    'analyze',
    'compact',
    'speed',
)
_ALL = MODES
_TRAIN = ('train',)

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Allowed:
  """What a field may hold: `test(value)` is true, `words` say it."""

  words: str
  test: Callable[[Any], bool]


def _is_whole(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (
      isinstance(value, numbers.Real)
      and not isinstance(value, bool)
      and math.isfinite(value)
  )


def _whole(low: int) -> _Allowed:
  return _Allowed(
      f'a whole number >= {low}', lambda v: _is_whole(v) and v >= low
  )


def _above(low: float) -> _Allowed:
  return _Allowed(f'a number > {low}', lambda v: _is_number(v) and v > low)


def _at_least(low: float) -> _Allowed:
  return _Allowed(f'a number >= {low}', lambda v: _is_number(v) and v >= low)


def _in(interval: str, test: Callable[[float], bool]) -> _Allowed:
  """A number in `interval` ('[0, 1)'), which `test` tells."""
  return _Allowed(
      f'a number in {interval}', lambda v: _is_number(v) and test(v)
  )


def _one_of(*choices: str) -> _Allowed:
  return _Allowed(
      f'one of {", ".join(map(repr, choices))}', lambda v: v in choices
  )


def _all(words: str, item: _Allowed) -> _Allowed:
  """A tuple or list of `item` values."""
  return _Allowed(
      words,
      lambda v: isinstance(v, (tuple, list)) and all(item.test(x) for x in v),
  )


def _are_widths(value: Any) -> bool:
  """One or more widths, each a whole number >= 1 or a group of them (a
  bottleneck unit's (inner, outer))."""
  return (
      isinstance(value, (tuple, list))
      and len(value) > 0
      and all((_is_whole(w) and w >= 1) or _are_widths(w) for w in value)
  )


_SIZE = _whole(1)
_WIDTHS = _Allowed(
    'one or more whole numbers >= 1 (or groups of them)', _are_widths
)
_FRACTION = _in('[0, 1)', lambda v: 0 <= v < 1)
_PROBABILITY = _in('[0, 1]', lambda v: 0 <= v <= 1)
_WEIGHT = _at_least(0)
_EPOCHS = _at_least(0)
_STEPS = _Allowed(
    '-1 (num_epochs decides) or a whole number >= 1',
    lambda v: _is_whole(v) and (v == -1 or v >= 1),
)


@dataclasses.dataclass(frozen=True)
class _Rule:
  """`field` (a dotted path) must be `allowed` in `modes`; where `when`
  is given, only in configs for which its test holds (its words say
  when)."""

  field: str
  allowed: _Allowed
  modes: Tuple[str, ...]
  when: Optional[Tuple[str, Callable[[ml_collections.ConfigDict], bool]]] = None


def _is(field: str, value: Any) -> Tuple[str, Callable]:
  """A `_Rule.when`: `field` holds `value`."""
  return (f'{field} is {value}', lambda c: _get(c, field) == value)


# The fields of each network (model.backbone, model.gater) that one of the
# registry's factories reads (gaternet_jax/models/__init__.py); a field a
# config leaves out is the factory's default.
_NETWORK_FIELDS = (
    ('depth', _SIZE),
    ('widths', _WIDTHS),
    ('width', _above(0)),  # an int for shake_shake, a scale for inception_v4
    ('stem_width', _SIZE),
    ('growth_rate', _SIZE),
    ('compression', _in('(0, 1]', lambda v: 0 < v <= 1)),
    ('se_reduction', _whole(0)),  # 0: no squeeze-and-excitation
    ('dropout_rate', _FRACTION),
    ('bottleneck', _SIZE),  # the gater's
)

_RULES = (
    # Batches. Benchmark and analysis batches of 0 take the run's.
    _Rule('batch_size', _SIZE, _TRAIN),
    _Rule('batch_size', _SIZE, ('benchmark',), _is('benchmark.batch_size', 0)),
    _Rule('eval_batch_size', _SIZE, ('train', 'eval')),
    _Rule(
        'eval_batch_size', _SIZE, ('analyze',), _is('analysis.batch_size', 0)
    ),
    # The run's length.
    _Rule('num_train_steps', _STEPS, _TRAIN),
    _Rule('num_epochs', _above(0), _TRAIN, _is('num_train_steps', -1)),
    # The training loop: the same as gaternet_jax/train.py's.
    _Rule('log_every_steps', _SIZE, _TRAIN),
    _Rule('checkpoint_every_steps', _SIZE, _TRAIN),
    _Rule('keep_checkpoints', _SIZE, _TRAIN),
    _Rule('steps_per_call', _SIZE, _TRAIN),
    _Rule('eval_every_epochs', _above(0), _TRAIN),
    _Rule('progress_every_secs', _at_least(0), _TRAIN),
    # The optimizer and its learning-rate schedule (gaternet_jax/optim.py).
    _Rule('optimizer.learning_rate', _above(0), _TRAIN),
    _Rule('optimizer.momentum', _FRACTION, _TRAIN),
    _Rule(
        'optimizer.lr_boundaries',
        _all('a sequence of numbers >= 0', _EPOCHS),
        _TRAIN,
    ),
    _Rule('optimizer.lr_decay', _above(0), _TRAIN),
    _Rule('optimizer.decay_epochs', _above(0), _TRAIN),
    _Rule('optimizer.warmup_epochs', _EPOCHS, _TRAIN),
    _Rule('optimizer.warmup_lr', _at_least(0), _TRAIN),
    _Rule('optimizer.rmsprop_decay', _FRACTION, _TRAIN),
    _Rule('optimizer.rmsprop_eps', _above(0), _TRAIN),
    _Rule('optimizer.poly_power', _above(0), _TRAIN),
    # The loss (gaternet_jax/losses.py).
    _Rule('weight_decay', _WEIGHT, _TRAIN),
    _Rule('gate_l1_weight', _WEIGHT, _TRAIN),
    _Rule('label_smoothing', _FRACTION, _TRAIN),
    _Rule('aux_loss_weight', _WEIGHT, _TRAIN),
    _Rule('batch_shaping.weight', _WEIGHT, _TRAIN),
    _Rule('batch_shaping.final_weight', _WEIGHT, _TRAIN),
    _Rule('batch_shaping.a', _above(0), _TRAIN),
    _Rule('batch_shaping.b', _above(0), _TRAIN),
    _Rule('batch_shaping.decay_start_epoch', _EPOCHS, _TRAIN),
    _Rule('batch_shaping.decay_end_epoch', _EPOCHS, _TRAIN),
    _Rule('l0.weight', _WEIGHT, _TRAIN),
    _Rule('l0.start_epoch', _EPOCHS, _TRAIN),
    _Rule('l0.ramp_epochs', _EPOCHS, _TRAIN),
    # The model, which every mode builds.
    *(
        _Rule(f'model.{network}.{key}', allowed, _ALL)
        for network in ('backbone', 'gater')
        for key, allowed in _NETWORK_FIELDS
    ),
    _Rule('model.semhash.mix_prob', _PROBABILITY, _ALL),
    _Rule('model.semhash.noise_std', _at_least(0), _ALL),
    _Rule('model.local_gating.hidden', _SIZE, _ALL),
    _Rule('model.local_gating.temperature', _above(0), _ALL),
    _Rule('model.gate_dropout', _FRACTION, _TRAIN),
    # --mode=benchmark.
    _Rule('benchmark.batch_size', _whole(0), ('benchmark',)),
    _Rule('benchmark.steps', _SIZE, ('benchmark',)),
    _Rule('benchmark.warmup_steps', _whole(0), ('benchmark',)),
    # --mode=compact (gaternet_jax/compact.py).
    _Rule('compact.split', _one_of('train', 'test'), ('compact',)),
    _Rule('compact.batch_size', _whole(0), ('compact',)),
    _Rule('compact.unseen', _one_of('report', 'keep'), ('compact',)),
    _Rule('compact.tolerance', _above(0), ('compact',)),
    # --mode=speed (gaternet_jax/speed.py).
    _Rule(
        'speed.densities',
        _all('fractions in (0, 1]', _in('(0, 1]', lambda v: 0 < v <= 1)),
        ('speed',),
    ),
    _Rule('speed.batch_size', _whole(0), ('speed',)),
    _Rule('speed.runs', _SIZE, ('speed',)),
    _Rule('speed.warmup', _whole(0), ('speed',)),
    _Rule('speed.num_buckets', _SIZE, ('speed',)),
    _Rule('speed.per_input_batch', _SIZE, ('speed',)),
    # --mode=analyze (gaternet_jax/analysis.py).
    _Rule('analysis.batch_size', _whole(0), ('analyze',)),
    _Rule('analysis.tsne_samples', _whole(0), ('analyze',)),
    _Rule('analysis.pca_dims', _SIZE, ('analyze',)),
    _Rule('analysis.tsne_perplexity', _above(0), ('analyze',)),
    _Rule('analysis.knn_k', _SIZE, ('analyze',)),
    _Rule('analysis.frequent_low', _PROBABILITY, ('analyze',)),
    _Rule('analysis.frequent_high', _PROBABILITY, ('analyze',)),
    _Rule('analysis.histogram_bins', _SIZE, ('analyze',)),
    _Rule('analysis.difficulty_bins', _SIZE, ('analyze',)),
    _Rule('analysis.dpi', _SIZE, ('analyze',)),
)


def check(config: ml_collections.ConfigDict, mode: str):
  """Refuses a config whose values cannot work for `mode`.

  Args:
    config: the experiment config.
    mode: one of cli.MODES; only the fields it reads are checked, and for
      'train' those of each pretraining stage too.

  Raises:
    ConfigError: the first field out of range, as one sentence such as
      "config.batch_size must be a whole number >= 1; got 0.".
    ValueError: `mode` is no mode.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}; got {mode!r}.')
  _check_fields(config, mode, lambda field: field)
  if mode == 'train':
    for stage_config, stage_mode, label in _stages(config):
      _check_fields(stage_config, stage_mode, label)


def check_model(config: ml_collections.ConfigDict):
  """Refuses a `config.model` whose network does not build for its
  dataset's images (say widths of another length than its stages): traced
  with `jax.eval_shape`, nothing computed (about a second for the largest
  ImageNet networks)."""
  # pylint: disable=g-import-not-at-top
  from gaternet_jax import data as data_lib
  from gaternet_jax import fingerprint

  if 'model' not in config or 'data' not in config:
    return
  _check_task(config)
  image_shape, num_classes = data_lib.dataset_info(config.data)
  try:
    fingerprint.model_fingerprint(config.model, image_shape, num_classes)
  except UserError:
    raise
  except (ValueError, TypeError, KeyError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ConfigError(
        f'config.model does not build a network for '
        f'{tuple(image_shape)} images: {reason}'
    ) from e


def _check_task(config: ml_collections.ConfigDict):
  """Segmentation models go with segmentation datasets, and the other way
  round; GaterNet's pretraining stages are classifiers."""
  from gaternet_jax import gating  # pylint: disable=g-import-not-at-top
  from gaternet_jax import segmentation  # pylint: disable=g-import-not-at-top

  seg = segmentation.enabled(config)
  name = config.data.get('name')
  if seg and name not in segmentation.DATASETS:
    raise ConfigError(
        f'model.segmentation.enabled needs a segmentation dataset '
        f'({", ".join(segmentation.DATASETS)}); data.name is {name!r}.'
    )
  if not seg and name in segmentation.DATASETS:
    raise ConfigError(
        f'data.name={name!r} has per-pixel labels: set '
        'model.segmentation.enabled=True.'
    )
  if (
      seg
      and gating.method(config) == gating.GATER
      and config.get('pretrain') is not None
      and config.pretrain.enabled
  ):
    raise ConfigError(
        "A segmentation run with model.gating='gater' trains from scratch: "
        "GaterNet's pretraining stages are classifiers; set "
        'pretrain.enabled=False.'
    )


def _check_fields(
    config: ml_collections.ConfigDict, mode: str, label: Callable[[str], str]
):
  """Checks `config` by the rules of `mode`, naming a field `label(field)`."""
  for rule in _RULES:
    if mode not in rule.modes:
      continue
    value = _get(config, rule.field)
    if value is _MISSING:
      continue  # The reader's default.
    when = ''
    if rule.when is not None:
      words, holds = rule.when
      if not holds(config):
        continue
      when = f' when {words}'
    if not rule.allowed.test(value):
      raise ConfigError(
          f'config.{label(rule.field)} must be {rule.allowed.words}{when}; '
          f'got {value!r}.'
      )


def _stages(
    config: ml_collections.ConfigDict,
) -> Iterator[Tuple[ml_collections.ConfigDict, str, Callable[[str], str]]]:
  """(config, mode, label) of each pretraining stage of a training run.

  A stage the run trains is checked as a training run, one it only loads
  as an evaluation; a field is named by the override that set it
  (`pretrain.overrides.batch_size`), since the rest is the run's own.
  """
  # Only here: the recipe imports the checkpoint and model libraries.
  from gaternet_jax import recipe  # pylint: disable=g-import-not-at-top

  pretrain = config.pretrain
  for stage in recipe.pretraining_stages(config, ''):
    layers = ['overrides']
    if stage.targets == ('gater',):
      layers.append('gater_overrides')  # recipe.stage_config's order
    label = functools.partial(_origin, pretrain, tuple(layers))
    yield stage.config, 'train' if stage.train else 'eval', label


def _origin(
    pretrain: ml_collections.ConfigDict, layers: Sequence[str], field: str
) -> str:
  """The name of `field` in a stage: that of the last override setting it,
  else its own."""
  for layer in reversed(layers):
    if _get(pretrain[layer], field) is not _MISSING:
      return f'pretrain.{layer}.{field}'
  return field


def _get(config: Any, field: str) -> Any:
  """The value at the dotted path `field`, or _MISSING."""
  node = config
  for key in field.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or (
        key not in node
    ):
      return _MISSING
    node = node[key]
  return node
