"""Config values that cannot work are refused before anything loads, and a
bad --config file or override is one sentence."""

import importlib
import math
import os
import re

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from configs import cifar10_densenet_bc100_k12
from configs import default
from gaternet_jax import cli
from gaternet_jax import config_checks
from gaternet_jax import flag_errors
from gaternet_jax.errors import ConfigError
from tests.test_main import REPO, _assert_one_line_error, _main

DEFAULT = os.path.join(REPO, 'configs', 'default.py')


def _with(config, field, value):
  """A copy of `config` with the dotted `field` set to `value`, of any
  type (ConfigDict would refuse True for an int, say)."""
  d = config.to_dict()
  *parents, key = field.split('.')
  node = d
  for parent in parents:
    node = node.setdefault(parent, {})
  node[key] = value
  return ml_collections.ConfigDict(d)


def _refused(config, mode, sentence):
  with pytest.raises(ConfigError, match=f'^{re.escape(sentence)}$'):
    config_checks.check(config, mode)


_SIZE = 'a whole number >= 1'

# (mode, field, value, what is allowed): before config_checks none of these
# was refused before the data loaded; most failed after it with a misleading
# error or none, and summary and benchmark runs with a traceback.
REFUSED = [
    ('train', 'batch_size', 0, _SIZE),
    ('train', 'batch_size', -8, _SIZE),
    ('train', 'batch_size', True, _SIZE),
    ('train', 'batch_size', 1.5, _SIZE),
    ('train', 'eval_batch_size', 0, _SIZE),
    ('eval', 'eval_batch_size', 0, _SIZE),
    ('train', 'num_train_steps', 0, '-1 (num_epochs decides) or ' + _SIZE),
    ('train', 'num_train_steps', -2, '-1 (num_epochs decides) or ' + _SIZE),
    ('train', 'num_epochs', 0, 'a number > 0 when num_train_steps is -1'),
    ('train', 'num_epochs', -1.0, 'a number > 0 when num_train_steps is -1'),
    ('train', 'optimizer.learning_rate', 0.0, 'a number > 0'),
    ('train', 'optimizer.learning_rate', -0.1, 'a number > 0'),
    ('train', 'optimizer.learning_rate', math.nan, 'a number > 0'),
    ('train', 'optimizer.learning_rate', math.inf, 'a number > 0'),
    ('train', 'optimizer.warmup_lr', -0.01, 'a number >= 0'),
    ('train', 'optimizer.warmup_epochs', -1.0, 'a number >= 0'),
    ('train', 'optimizer.momentum', 1.0, 'a number in [0, 1)'),
    ('train', 'optimizer.momentum', -0.5, 'a number in [0, 1)'),
    ('train', 'optimizer.lr_decay', 0.0, 'a number > 0'),
    ('train', 'optimizer.decay_epochs', 0.0, 'a number > 0'),
    (
        'train',
        'optimizer.lr_boundaries',
        (20, -1),
        'a sequence of numbers >= 0',
    ),
    ('train', 'optimizer.rmsprop_decay', 1.0, 'a number in [0, 1)'),
    ('train', 'optimizer.rmsprop_eps', 0.0, 'a number > 0'),
    ('train', 'weight_decay', -1e-4, 'a number >= 0'),
    ('train', 'gate_l1_weight', -0.1, 'a number >= 0'),
    ('train', 'label_smoothing', 1.0, 'a number in [0, 1)'),
    ('train', 'aux_loss_weight', -1.0, 'a number >= 0'),
    ('train', 'batch_shaping.weight', -1.0, 'a number >= 0'),
    ('train', 'batch_shaping.final_weight', -0.5, 'a number >= 0'),
    ('train', 'batch_shaping.a', 0.0, 'a number > 0'),
    ('train', 'batch_shaping.decay_end_epoch', -1.0, 'a number >= 0'),
    ('train', 'l0.weight', -1.0, 'a number >= 0'),
    ('train', 'l0.ramp_epochs', -1.0, 'a number >= 0'),
    ('train', 'progress_every_secs', -1.0, 'a number >= 0'),
    ('train', 'model.gate_dropout', 1.0, 'a number in [0, 1)'),
    ('train', 'model.backbone.depth', 0, _SIZE),
    ('train', 'model.backbone.se_reduction', -1, 'a whole number >= 0'),
    ('train', 'model.gater.bottleneck', 0, _SIZE),
    ('train', 'model.local_gating.hidden', 0, _SIZE),
    ('train', 'model.local_gating.temperature', 0.0, 'a number > 0'),
    ('train', 'model.semhash.noise_std', -1.0, 'a number >= 0'),
    ('train', 'model.semhash.mix_prob', 1.5, 'a number in [0, 1]'),
    ('benchmark', 'benchmark.steps', 0, _SIZE),
    ('benchmark', 'benchmark.warmup_steps', -1, 'a whole number >= 0'),
    ('benchmark', 'benchmark.batch_size', -1, 'a whole number >= 0'),
    ('benchmark', 'batch_size', 0, _SIZE + ' when benchmark.batch_size is 0'),
    ('analyze', 'eval_batch_size', 0, _SIZE + ' when analysis.batch_size is 0'),
    ('analyze', 'analysis.tsne_perplexity', 0.0, 'a number > 0'),
]

_WIDTHS = 'one or more whole numbers >= 1 (or groups of them)'
REFUSED += [
    (mode, f'model.{network}.widths', widths, _WIDTHS)
    for mode in ('train', 'summary')
    for network in ('backbone', 'gater')
    for widths in ((16, 0, 64), ())
]

# Refused before config_checks too, just before the data loaded (train.py's
# loop fields, analysis.py's), and here with the same meaning.
ALSO_CHECKED_LATER = [
    ('train', 'log_every_steps', 0, _SIZE),
    ('train', 'checkpoint_every_steps', 0, _SIZE),
    ('train', 'keep_checkpoints', 0, _SIZE),
    ('train', 'steps_per_call', 0, _SIZE),
    ('train', 'steps_per_call', 2.0, _SIZE),
    ('train', 'eval_every_epochs', 0.0, 'a number > 0'),
    ('analyze', 'analysis.batch_size', -1, 'a whole number >= 0'),
    ('analyze', 'analysis.tsne_samples', -1, 'a whole number >= 0'),
    ('analyze', 'analysis.pca_dims', 0, _SIZE),
    ('analyze', 'analysis.knn_k', 0, _SIZE),
    ('analyze', 'analysis.frequent_high', 1.5, 'a number in [0, 1]'),
    ('analyze', 'analysis.histogram_bins', 0, _SIZE),
    ('analyze', 'analysis.difficulty_bins', 0, _SIZE),
    ('analyze', 'analysis.dpi', 0, _SIZE),
]


@pytest.mark.parametrize(
    'mode, field, value, allowed', REFUSED + ALSO_CHECKED_LATER
)
def test_a_value_that_cannot_work_is_named_with_what_is_allowed(
    mode, field, value, allowed
):
  config = _with(default.get_config(), field, value)
  _refused(config, mode, f'config.{field} must be {allowed}; got {value!r}.')


@pytest.mark.parametrize(
    'mode, field, value',
    [
        ('summary', 'batch_size', 0),
        ('summary', 'optimizer.learning_rate', 0.0),
        ('eval', 'num_epochs', 0),
        ('eval', 'batch_size', 0),
        ('benchmark', 'eval_batch_size', 0),
        ('benchmark', 'optimizer.learning_rate', 0.0),
        ('analyze', 'batch_size', 0),
        ('train', 'benchmark.steps', 0),
        ('train', 'analysis.dpi', 0),
    ],
)
def test_a_mode_leaves_the_fields_it_does_not_read(mode, field, value):
  config_checks.check(_with(default.get_config(), field, value), mode)


def test_a_field_another_one_stands_in_for_is_left():
  config = default.get_config()
  config.num_train_steps = 10
  config.num_epochs = 0
  config_checks.check(config, 'train')  # The steps decide.
  config.benchmark.batch_size = 32
  config.batch_size = 0
  config_checks.check(config, 'benchmark')
  config.analysis.batch_size = 100
  config.eval_batch_size = 0
  config_checks.check(config, 'analyze')


def test_pretraining_stage_values_are_named_by_their_override():
  config = default.get_config()  # One baseline stage, pretrain.overrides.
  _refused(
      _with(config, 'pretrain.overrides.batch_size', 0),
      'train',
      'config.pretrain.overrides.batch_size must be a whole number >= 1; '
      'got 0.',
  )
  _refused(
      _with(config, 'pretrain.overrides.num_epochs', 0),
      'train',
      'config.pretrain.overrides.num_epochs must be a number > 0 when '
      'num_train_steps is -1; got 0.',
  )
  with pytest.raises(ConfigError, match='pretrain.overrides.batch_sise'):
    config_checks.check(
        _with(config, 'pretrain.overrides.batch_sise', 8), 'train'
    )
  # No stage without pretraining, nor in another mode.
  bad = _with(config, 'pretrain.overrides.batch_size', 0)
  config_checks.check(bad, 'eval')
  config_checks.check(_with(bad, 'pretrain.enabled', False), 'train')
  # The gater's own stage (its network differs) adds gater_overrides.
  densenet = cifar10_densenet_bc100_k12.get_config()
  _refused(
      _with(densenet, 'pretrain.gater_overrides.optimizer.learning_rate', 0.0),
      'train',
      'config.pretrain.gater_overrides.optimizer.learning_rate must be a '
      'number > 0; got 0.0.',
  )
  # A stage the config names a workdir of is only evaluated, not trained.
  loaded = _with(config, 'pretrain.backbone_workdir', '/trained')
  loaded = _with(loaded, 'pretrain.gater_workdir', '/trained')
  config_checks.check(
      _with(loaded, 'pretrain.overrides.optimizer.learning_rate', 0.0), 'train'
  )
  _refused(
      _with(loaded, 'pretrain.overrides.eval_batch_size', 0),
      'train',
      'config.pretrain.overrides.eval_batch_size must be a whole number >= 1;'
      ' got 0.',
  )


def test_every_config_file_passes_in_every_mode():
  names = sorted(
      name[: -len('.py')]
      for name in os.listdir(os.path.join(REPO, 'configs'))
      if name.endswith('.py') and not name.startswith('_')
  )
  checked = 0
  for name in names:
    module = importlib.import_module(f'configs.{name}')
    if not hasattr(module, 'get_config'):
      continue  # A family's shared code (configs/cifar.py, ...).
    config = module.get_config()
    for mode in cli.MODES:
      config_checks.check(config, mode)
    checked += 1
  assert checked > 60
  with pytest.raises(ValueError, match='mode'):
    config_checks.check(default.get_config(), 'fit')


# ---------------------------------------------------------------------------
# The --config flag: its file and its overrides (gaternet_jax/flag_errors.py).


def _flag_error(config_file, *overrides):
  """The sentence for parsing `--config=config_file` and `overrides`."""
  argv = ['main.py', f'--config={config_file}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config',
      None,
      '',
      flag_values=flag_values,
      lock_config=True,
      sys_argv=argv,
  )
  with pytest.raises(Exception) as raised:
    flag_values(argv)
  return flag_errors.config_flag_error(raised.value, argv, flag_values)


@pytest.mark.parametrize(
    'source, sentence',
    [
        (
            'def make_config():\n  return None\n',
            'the --config file {} has no get_config() function.',
        ),
        (
            'def get_config(:\n  pass\n',
            'cannot load the --config file {} (SyntaxError at line 1: '
            'invalid syntax).',
        ),
        (
            'import os\nX = undefined_name\n',
            'cannot load the --config file {} (NameError at line 2: name '
            "'undefined_name' is not defined).",
        ),
        (
            "def get_config():\n  raise RuntimeError('no GPU here')\n",
            'cannot load the --config file {} (RuntimeError at line 2: no '
            'GPU here).',
        ),
        (  # config_flags wraps a TypeError in a flags.Error.
            'def get_config():\n  return len(5)\n',
            'cannot load the --config file {} (TypeError at line 2: object '
            "of type 'int' has no len()).",
        ),
        (
            'from configs import base\n\ndef get_config():\n'
            '  return base.base_config().optimizer.learnig_rate\n',
            'cannot load the --config file {} (AttributeError at line 4: '
            'config has no field learnig_rate (did you mean learning_rate?)).',
        ),
        (  # A config's ValueError is a sentence for the user.
            "def get_config():\n  raise ValueError('Use configs/x.py.')\n",
            'Use configs/x.py.',
        ),
    ],
)
def test_a_bad_config_file_is_one_sentence(tmp_path, source, sentence):
  path = tmp_path / 'bad_config.py'
  path.write_text(source)
  assert _flag_error(str(path)) == sentence.format(path)


@pytest.mark.parametrize(
    'override, sentence',
    [
        (
            '--config.optimizer.learnig_rate=0.1',
            '--config.optimizer.learnig_rate: config has no field '
            'learnig_rate (did you mean learning_rate?).',
        ),
        (
            '--config.nothing.here=1',
            '--config.nothing.here: config has no field nothing.',
        ),
        (
            '--config.batch_size=abc',
            "--config.batch_size must be a whole number; got 'abc'.",
        ),
        (
            '--config.batch_size=True',
            "--config.batch_size must be a whole number; got 'True'.",
        ),
        (
            '--config.eval_every_epochs=often',
            "--config.eval_every_epochs must be a number; got 'often'.",
        ),
        (
            '--config.tensorboard=maybe',
            "--config.tensorboard must be True or False; got 'maybe'.",
        ),
    ],
)
def test_a_bad_override_is_one_sentence(override, sentence):
  assert _flag_error(DEFAULT, override) == sentence


def test_another_flag_error_is_left_to_absl():
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values)
  error = flags.UnrecognizedFlagError('nosuchflag')
  assert flag_errors.config_flag_error(error, ['main.py'], flag_values) is None


# ---------------------------------------------------------------------------
# Through main.py: one Python start each.


def test_unknown_field_through_main_keeps_the_suggestion():
  proc = _main(
      '--config=configs/default.py',
      '--workdir=/nonexistent/run',
      '--config.optimizer.learnig_rate=0.1',
  )
  _assert_one_line_error(proc)
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --config.optimizer.learnig_rate: config has no field '
      'learnig_rate (did you mean learning_rate?).'
  )


def test_config_file_without_get_config_through_main(tmp_path):
  path = tmp_path / 'no_get_config.py'
  path.write_text('import ml_collections\n')
  proc = _main(f'--config={path}', '--mode=summary')
  _assert_one_line_error(proc)
  assert proc.stderr.strip().splitlines()[-1] == (
      f'error: the --config file {path} has no get_config() function.'
  )


def test_a_size_of_zero_is_refused_before_the_data_loads(tmp_path):
  # Without batch_size=0 this run stops at its missing dataset
  # (test_main.test_missing_dataset_is_one_clear_line); before, a batch of
  # 0 was reported as one that "exceeds the 1437 training examples".
  proc = _main(
      '--config=configs/cifar10_r20.py',
      f'--workdir={tmp_path}/run',
      '--config.data.source=folder',
      f'--config.data.data_dir={tmp_path}/nowhere',
      '--config.batch_size=0',
  )
  _assert_one_line_error(proc)
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.batch_size must be a whole number >= 1; got 0.'
  )
  assert not os.path.exists(tmp_path / 'run')


def test_a_model_that_does_not_build_is_one_sentence():
  config = default.get_config()
  config_checks.check_model(config)
  config.model.backbone.widths = (4, 8, 16, 32)  # 4 widths, 3 stages
  with pytest.raises(
      ConfigError,
      match=r'config.model does not build a network for \(8, 8, 1\) images: '
      r'stage_sizes \(1, 1, 1\) and widths \(4, 8, 16, 32\) differ',
  ):
    config_checks.check_model(config)
