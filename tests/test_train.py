"""The training system: steps, sharding, resume, recipe, learning."""

import json
import os
import shutil
import subprocess
import sys

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaternet_jax import checkpoints
from gaternet_jax import evaluation
from gaternet_jax import experiment
from gaternet_jax import fingerprint
from gaternet_jax import losses
from gaternet_jax import optim
from gaternet_jax import recipe
from gaternet_jax import sharding
from gaternet_jax import steps as steps_lib
from gaternet_jax import train as train_lib
from gaternet_jax.gates import GateSpec
from gaternet_jax.models import GaterNet, create_model
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir):
  return checkpoints.load_variables(workdir)


def _assert_trees_close(a, b, atol):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_one_step_on_8_devices_matches_1_device(tmp_path):
  outs = []
  for n in (1, 8):
    out = tmp_path / f'step_{n}.npz'
    env = dict(
        os.environ,
        XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
        JAX_PLATFORMS='cpu',
    )
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, 'tests', 'sharded_step.py'),
            str(out),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f'devices={n}' in proc.stdout
    outs.append(dict(np.load(out)))
  one, eight = outs
  assert set(one) == set(eight) and len(one) > 20
  for k in one:
    np.testing.assert_allclose(
        one[k], eight[k], atol=1e-5, rtol=1e-5, err_msg=k
    )
  # BatchNorm statistics were taken over the global batch, not per device.
  assert any(k.startswith('batch_stats') for k in one)


def test_kill_and_resume_equals_uninterrupted(tmp_path):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=True)
  config.num_train_steps = 7
  config.log_every_steps = 1  # So the killed run logs past its checkpoint.
  ref = train_lib.train(config, str(tmp_path / 'ref'), dataset=ds)

  class Killed(Exception):
    pass

  def kill_at(step):
    def cb(s):
      if s == step:
        raise Killed()

    return cb

  wd = str(tmp_path / 'killed')
  with pytest.raises(Killed):  # dies after step 5; last checkpoint is step 4
    train_lib.train(config, wd, dataset=ds, step_callback=kill_at(5))
  # train() returned only after its async save had been committed, and
  # checkpoints stay on their grid (no save of step 1 off it).
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2', '4']
  config.keep_checkpoints = 2
  with pytest.raises(Killed):  # dies again right after a checkpointed step
    train_lib.train(config, wd, dataset=ds, step_callback=kill_at(6))
  # ... and after max_to_keep had deleted the oldest one.
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['4', '6']
  config.keep_checkpoints = 3
  resumed = train_lib.train(config, wd, dataset=ds)
  a, b = _params(str(tmp_path / 'ref')), _params(wd)
  assert a['step'] == b['step'] == 7
  _assert_trees_close(a['params'], b['params'], atol=1e-6)
  _assert_trees_close(a['batch_stats'], b['batch_stats'], atol=1e-6)
  assert resumed['accuracy'] == ref['accuracy']
  # A finished run restarted only evaluates.
  again = train_lib.train(config, wd, dataset=ds)
  assert again['step'] == 7 and again['accuracy'] == ref['accuracy']

  # metrics.jsonl has the train and eval scalars, each step's once: the
  # records the killed runs wrote after their last checkpoint were dropped,
  # and the finished run's re-evaluation added no second results.
  def records(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      recs = [json.loads(l) for l in f]
    return [
        (
            r['step'],
            r['kind'],
            sorted(k for k in r if '/' in k or k == 'results'),
        )
        for r in recs
        if r['kind'] == 'texts'
        or any(k.startswith(('train/', 'test/')) for k in r)
    ]

  keys = set().union(*(k for _, _, k in records(wd)))
  assert {
      'train/loss',
      'train/gate_l1',
      'test/accuracy',
      'test/gates_always_on',
      'test/gates_input_dependent',
  } <= keys
  assert records(wd) == records(str(tmp_path / 'ref'))


def test_train_seconds_add_up_over_resumes(tmp_path, monkeypatch):
  """results.json's train_seconds count every run that trained the workdir
  (kept in checkpoint metadata), and a re-evaluation adds nothing."""

  class Clock:  # One second a reading, so the sums are exact.
    now = 0.0

    def time(self):
      Clock.now += 1.0
      return Clock.now

  monkeypatch.setattr(train_lib, 'time', Clock())
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=True)
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  wd = str(tmp_path / 'run')

  class Killed(Exception):
    pass

  def kill_at_3(s):
    if s == 3:
      raise Killed()

  with pytest.raises(Killed):
    train_lib.train(config, wd, dataset=ds, step_callback=kill_at_3)
  ckpt = checkpoints.Checkpointer(wd, read_only=True)
  first = ckpt.train_seconds(2)
  ckpt.close()
  assert first > 0
  resumed = train_lib.train(config, wd, dataset=ds)
  # This run read the clock at its start and after steps 3 and 4.
  assert resumed['train_seconds'] == first + 2
  assert checkpoints.train_seconds(wd) == resumed['train_seconds']
  again = train_lib.train(config, wd, dataset=ds)
  assert again['train_seconds'] == resumed['train_seconds']
  with open(os.path.join(wd, 'results.json')) as f:
    assert json.load(f)['train_seconds'] == resumed['train_seconds']
  assert evaluation.evaluate(config, wd, dataset=ds)['train_seconds'] == (
      resumed['train_seconds']
  )


def test_steps_per_epoch_are_the_datasets():
  """The trainer's epoch is the dataset's (a streamed one sharded over
  processes counts full batches of its smallest shard)."""

  class Sharded:
    num_train_examples = 1000

    def steps_per_epoch(self, batch_size):
      return 7 if batch_size == 100 else 0

  config = helpers.tiny_config()
  config.batch_size, config.num_epochs, config.num_train_steps = 100, 3, -1
  assert experiment.num_steps(config, Sharded()) == (7, 21)
  ds = helpers.synthetic_dataset()
  config.batch_size = ds.num_train_examples + 1
  with pytest.raises(train_lib.ConfigError, match='exceeds'):
    experiment.num_steps(config, ds)


def test_gate_l1_gradient_reaches_only_the_gater():
  config = helpers.tiny_config(gated=True)
  model = create_model(config.model, 3)
  spec = model.gate_spec()
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  v = model.init({'params': jax.random.key(1), 'gates': jax.random.key(2)}, x)
  config.weight_decay, config.gate_l1_weight = 0.0, 1.0
  loss_fn = losses.objective(config, spec)

  def l1(params):
    (_, out), _ = model.apply(
        {'params': params, 'batch_stats': v['batch_stats']},
        x,
        train=True,
        rngs={'gates': jax.random.key(3)},
        mutable=['batch_stats'],
    )
    return loss_fn(
        params,
        jnp.zeros((4, 3)),
        out,
        jnp.zeros(4, jnp.int32),
        jnp.zeros((), jnp.int32),
    )[0]

  g = jax.jit(jax.grad(l1))(v['params'])
  assert all(
      float(jnp.abs(x).max()) == 0
      for x in jax.tree_util.tree_leaves(g['backbone'])
  )
  assert float(jnp.abs(g['gater']['fc2']['kernel']).max()) > 0


def test_weight_decay_only_on_kernels():
  params = {
      'conv': {'kernel': jnp.ones((3, 3, 2, 2))},
      'bn': {'scale': jnp.ones(2), 'bias': jnp.ones(2)},
      'fc': {'kernel': jnp.ones((2, 5)), 'bias': jnp.ones(5)},
  }
  assert float(losses.weight_l2(params)) == pytest.approx(0.5 * (36 + 10))


def test_learning_rate_schedules():
  cfg = helpers.tiny_config().optimizer
  cfg.lr_boundaries = (2, 3)
  fn = optim.create_learning_rate_fn(
      cfg, steps_per_epoch=10, num_train_steps=40
  )
  np.testing.assert_allclose(
      [fn(0), fn(19), fn(20), fn(30)], [0.1, 0.1, 0.01, 0.001], rtol=1e-6
  )
  cfg.warmup_epochs = 1.0
  fn = optim.create_learning_rate_fn(cfg, 10, 40)
  assert float(fn(0)) == pytest.approx(0.01, rel=1e-6)
  assert float(fn(15)) == pytest.approx(0.1, rel=1e-6)
  # He et al.'s ResNet-164 warm-up holds 0.01, then the step schedule runs
  # on its absolute epochs.
  cfg.warmup_lr = 0.01
  fn = optim.create_learning_rate_fn(cfg, 10, 40)
  np.testing.assert_allclose(
      [fn(0), fn(9), fn(10), fn(19), fn(20), fn(30)],
      [0.01, 0.01, 0.1, 0.1, 0.01, 0.001],
      rtol=1e-6,
  )
  # Cosine: the same linear ramp as the step schedule, then a cosine that
  # starts after the warm-up and reaches 0 at the end.
  cfg.warmup_lr = 0.0
  cfg.schedule = 'cosine'
  fn = optim.create_learning_rate_fn(cfg, 10, 40)
  np.testing.assert_allclose(
      [fn(0), fn(9), fn(10), fn(25), fn(40)],
      [0.01, 0.1, 0.1, 0.05, 0.0],
      rtol=1e-6,
      atol=1e-7,
  )
  from configs import cifar10_r164  # pylint: disable=g-import-not-at-top

  r164 = cifar10_r164.get_config().optimizer
  fn = optim.create_learning_rate_fn(r164, 390, 390 * 160)
  np.testing.assert_allclose(
      [fn(0), fn(389), fn(390), fn(390 * 80)],
      [0.01, 0.01, 0.1, 0.01],
      rtol=1e-6,
  )


def test_recipe_pretrains_then_initialises_both_parts(tmp_path):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=True)
  config.pretrain.enabled = True
  config.pretrain.overrides.num_train_steps = 4
  config.num_train_steps = 2
  out = train_lib.train_and_evaluate(
      config, str(tmp_path / 'gated'), dataset=ds
  )
  assert set(out) == {'baseline', 'final'}
  stages = recipe.pretraining_stages(config, str(tmp_path / 'gated'))
  assert [s.name for s in stages] == ['baseline']
  assert stages[0].targets == ('backbone', 'gater')
  pre = _params(stages[0].workdir)
  assert pre['step'] == 4
  # Initialise a fresh gated state from the stage; compare with its weights.
  model = create_model(config.model, ds.num_classes)
  state = steps_lib.create_train_state(
      config,
      model,
      (16, 16, 3),
      lambda s: 0.1,
      jax.random.key(0),
      sharding.create_mesh(),
  )
  state = recipe.stage_init(stages[0])(state)
  _assert_trees_close(state.params['backbone'], pre['params']['backbone'], 0)
  features = {k: v for k, v in pre['params']['backbone'].items() if k != 'fc'}
  _assert_trees_close(state.params['gater']['features'], features, 0)
  _assert_trees_close(
      state.batch_stats['gater']['features'], pre['batch_stats']['backbone'], 0
  )
  # Resuming the joint run never retrains a stage, even one that is gone.
  shutil.rmtree(stages[0].workdir)
  config.num_train_steps = 4  # a longer run: a change the flag allows
  again = train_lib.train_and_evaluate(
      config, str(tmp_path / 'gated'), dataset=ds, allow_config_change=True
  )
  assert set(again) == {'final'} and again['final']['step'] == 4
  assert not os.path.exists(stages[0].workdir)


def test_recipe_reads_a_named_pretraining_run_without_training_it(tmp_path):
  ds = helpers.synthetic_dataset()
  given = str(tmp_path / 'baseline')
  base = helpers.tiny_config(gated=False)
  base.num_train_steps = 4
  base.optimizer.nesterov = True  # another optimiser than the gated run's
  train_lib.train(base, given, dataset=ds)
  before = sorted(os.listdir(os.path.join(given, 'checkpoints')))
  config = helpers.tiny_config(gated=True)
  config.pretrain.enabled = True
  config.pretrain.backbone_workdir = given
  config.pretrain.gater_workdir = given
  config.num_train_steps = 8  # longer than the named run: it stays at 4
  out = train_lib.train_and_evaluate(
      config, str(tmp_path / 'gated'), dataset=ds
  )
  assert out['baseline']['step'] == 4 and out['final']['step'] == 8
  assert sorted(os.listdir(os.path.join(given, 'checkpoints'))) == before
  assert (
      out['baseline']['accuracy']
      == evaluation.evaluate(base, given, dataset=ds)['accuracy']
  )
  # --mode=eval of a run with the config of another network: one sentence
  # that names the layer that differs.
  wider = helpers.tiny_config(gated=False)
  wider.model.backbone.widths = (4, 8, 32)
  with pytest.raises(
      train_lib.WorkdirError, match=r'different `model` config.*\(16,\)'
  ):
    evaluation.evaluate(wider, given, dataset=ds)
  # A named run without checkpoints is refused in one sentence.
  config.pretrain.backbone_workdir = config.pretrain.gater_workdir = str(
      tmp_path / 'missing'
  )
  with pytest.raises(train_lib.WorkdirError, match='has no checkpoint'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'gated2'), dataset=ds)
  assert not os.path.exists(tmp_path / 'missing')


def test_recipe_uses_two_stages_when_gater_differs(tmp_path):
  config = helpers.tiny_config(gated=True)
  config.pretrain.enabled = True
  config.model.gater.widths = (4, 4, 8)
  stages = recipe.pretraining_stages(config, str(tmp_path))
  assert [s.name for s in stages] == ['backbone', 'gater']
  assert stages[1].config.model.backbone.widths == (4, 4, 8)
  assert stages[1].config.model.gating == 'none'
  # A named workdir is loaded, not trained.
  config.pretrain.backbone_workdir = str(tmp_path / 'given')
  stages = recipe.pretraining_stages(config, str(tmp_path))
  assert stages[0].workdir == str(tmp_path / 'given') and not stages[0].train


def test_short_digits_run_learns(tmp_path):
  config = helpers.tiny_config(gated=True)
  config.data.name = 'digits'
  config.data.source = 'builtin'
  config.data.mean = None
  config.data.std = None
  config.data.crop_padding = 1
  config.data.flip = False
  config.model.backbone.widths = (8, 16, 32)
  config.model.gater.widths = (8, 16, 32)
  config.batch_size = 64
  config.eval_batch_size = 120
  config.num_train_steps = 200
  config.optimizer.lr_boundaries = (7,)
  config.checkpoint_every_steps = 1000
  results = train_lib.train(config, str(tmp_path))
  assert results['accuracy'] > 0.9, results  # chance is 0.1
  assert results['gated_filters'] == 8 + 16 + 32
  assert (
      results['gates_always_on']
      + results['gates_always_off']
      + results['gates_input_dependent']
  ) == 56


def test_gate_dropout_schedule_and_effect():
  config = helpers.tiny_config(gated=True)
  assert optim.create_gate_dropout_fn(config, 100)(jnp.asarray(50)) == 0.0
  config.model.gate_dropout = 0.05
  fn = optim.create_gate_dropout_fn(config, 100)
  np.testing.assert_allclose(
      [fn(jnp.asarray(s)) for s in (0, 50, 100, 200)],
      [0, 0.025, 0.05, 0.05],
      rtol=1e-6,
  )
  config.model.gate_dropout = 1.5
  with pytest.raises(train_lib.ConfigError):
    optim.create_gate_dropout_fn(config, 100)
  # In the model: rate 1 closes every gate the backbone sees; the returned
  # gates are the gater's own G(x), which the L1 term and statistics use.
  model = create_model(helpers.tiny_config(gated=True).model, 3)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  v = model.init({'params': jax.random.key(1), 'gates': jax.random.key(2)}, x)
  apply = jax.jit(
      lambda v, x, r: model.apply(
          v,
          x,
          train=True,
          gate_dropout=r,
          rngs={'gates': jax.random.key(3)},
          mutable=('batch_stats',),
      )[0]
  )
  dropped_logits, dropped_out = apply(v, x, jnp.asarray(1.0))
  logits, out = apply(v, x, jnp.asarray(0.0))
  dropped_gates, gates = dropped_out['gates'], out['gates']
  assert any(float(g.max()) > 0.0 for g in gates.values())
  _assert_trees_close(dropped_gates, gates, 0)
  closed = {k: jnp.zeros_like(g) for k, g in gates.items()}
  (closed_logits, _), _ = model.apply(
      v,
      x,
      closed,
      method=lambda m, x, g: m.backbone(x, g, train=True),
      mutable=('batch_stats',),
  )
  np.testing.assert_allclose(dropped_logits, closed_logits, atol=1e-5)
  assert not np.allclose(logits, dropped_logits, atol=1e-3)


def test_bfloat16_step_matches_float32():
  """Mixed precision: bf16 compute, f32 params and optimiser state."""
  ds = helpers.synthetic_dataset()
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = helpers.tiny_config(gated=True)
    config.model.dtype = dtype
    model = create_model(config.model, ds.num_classes)
    mesh = sharding.create_mesh()
    state = steps_lib.create_train_state(
        config, model, (16, 16, 3), lambda s: 0.1, jax.random.key(0), mesh
    )
    steps = steps_lib.Steps(
        config,
        model.gate_spec(),
        mesh,
        ds.mean,
        ds.std,
        augmentation=ds.augmentation,
    )
    batch = next(ds.train_batches(config.batch_size, seed=0))
    new_state, m = steps.train(state, batch, jax.random.key(1))
    results[dtype] = (jax.device_get(m), new_state)
  (m32, s32), (m16, s16) = results['float32'], results['bfloat16']
  assert all(
      x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(s16.params)
  )
  assert all(
      x.dtype == jnp.float32
      for x in jax.tree_util.tree_leaves(s16.opt_state)
      if jnp.issubdtype(x.dtype, jnp.floating)
  )
  # Stated tolerance: bf16 has an 8-bit mantissa (relative error ~4e-3 per
  # op); the loss of one step agrees within 5%, the updated parameters
  # within 2e-2 of an update of size ~lr * grad.
  assert m16['cross_entropy'] != m32['cross_entropy']  # bf16 really ran
  assert abs(m16['cross_entropy'] - m32['cross_entropy']) <= 0.05 * abs(
      m32['cross_entropy']
  )
  for a, b in zip(
      jax.tree_util.tree_leaves(s16.params),
      jax.tree_util.tree_leaves(s32.params),
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-2)


def test_on_device_scanned_steps_match_single_steps_and_resume(tmp_path):
  """data.on_device: k steps per call give the same run as 1 per call, and
  a killed run resumes to the same parameters."""
  ds = helpers.synthetic_dataset()
  finals = {}
  for per_call in (1, 4):
    config = helpers.tiny_config(gated=True)
    config.data.on_device = True
    config.steps_per_call = per_call
    config.num_train_steps = 7
    config.log_every_steps = 7
    config.checkpoint_every_steps = 3
    train_lib.train(config, str(tmp_path / f'k{per_call}'), dataset=ds)
    finals[per_call] = _params(str(tmp_path / f'k{per_call}'))
  assert finals[1]['step'] == finals[4]['step'] == 7
  _assert_trees_close(finals[1]['params'], finals[4]['params'], atol=1e-6)

  class Killed(Exception):
    pass

  def kill(step):
    if step >= 4:
      raise Killed()

  wd = str(tmp_path / 'killed')
  with pytest.raises(Killed):
    train_lib.train(config, wd, dataset=ds, step_callback=kill)
  train_lib.train(config, wd, dataset=ds)
  _assert_trees_close(_params(wd)['params'], finals[4]['params'], atol=1e-6)
  # The streamed path refuses on_device clearly.
  with pytest.raises(train_lib.ConfigError):
    config.data.name = 'fake'
    config.data.image_size = 16
    train_lib.train(config, str(tmp_path / 'fake'))


class _AuxNet(nn.Module):
  """A tiny backbone with an auxiliary classifier, as Inception-v4 has."""

  supports_local_gating: ClassVar[bool] = False
  local_gating: ClassVar[None] = None
  num_classes: int = 3

  def gate_spec(self):
    return GateSpec()

  def gate_wiring(self):
    return {}

  @nn.compact
  def __call__(self, x, gates=None, *, train=False):
    y = jnp.mean(x, axis=(1, 2))
    aux = nn.Dense(self.num_classes, name='aux')(y)  # same params in eval
    return (
        nn.Dense(self.num_classes, name='fc')(y),
        {'aux_logits': aux} if train else {},
    )


@pytest.mark.parametrize('weight', [0.0, 0.4])
def test_auxiliary_classifier_loss(weight):
  ds = helpers.synthetic_dataset()
  config = helpers.tiny_config(gated=False)
  config.aux_loss_weight = weight
  config.weight_decay = 0.0
  model = GaterNet(backbone=_AuxNet())
  mesh = sharding.create_mesh()
  state = steps_lib.create_train_state(
      config, model, (16, 16, 3), lambda s: 0.1, jax.random.key(0), mesh
  )
  before = jax.device_get(state.params)
  steps = steps_lib.Steps(
      config,
      model.gate_spec(),
      mesh,
      ds.mean,
      ds.std,
      augmentation=ds.augmentation,
  )
  new, m = steps.train(
      state, next(ds.train_batches(16, seed=0)), jax.random.key(1)
  )
  m = jax.device_get(m)
  assert m['aux_cross_entropy'] > 0
  np.testing.assert_allclose(
      m['loss'], m['cross_entropy'] + weight * m['aux_cross_entropy'], rtol=1e-5
  )
  moved = np.abs(
      np.asarray(new.params['backbone']['aux']['kernel'])
      - before['backbone']['aux']['kernel']
  ).max()
  assert (moved > 0) == (weight > 0)


def test_a_baseline_workdir_serves_as_a_pretraining_stage(tmp_path):
  # A run of configs/cifar10_r20_baseline.py writes se_reduction=0 and a
  # gater section its ungated model never builds; the recipe's stage config
  # has neither. Same network, so the workdir is accepted; another depth or
  # another gater (when gated) is refused.
  from configs import cifar10_r20, cifar10_r20_baseline  # pylint: disable=g-import-not-at-top
  from gaternet_jax.errors import WorkdirError  # pylint: disable=g-import-not-at-top

  wd = str(tmp_path)
  with open(os.path.join(wd, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(cifar10_r20_baseline.get_config().to_json_best_effort())
  (stage,) = recipe.pretraining_stages(cifar10_r20.get_config(), wd)
  fingerprint.check_workdir(stage.config, wd)
  other = cifar10_r20_baseline.get_config()
  other.model.backbone.depth = 32
  with pytest.raises(WorkdirError, match='different `model`'):
    fingerprint.check_workdir(other, wd)
  gated = cifar10_r20.get_config()
  with open(os.path.join(wd, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(gated.to_json_best_effort())
  fingerprint.check_workdir(gated, wd)
  gated.model.gater.bottleneck = 16
  with pytest.raises(WorkdirError, match='different `model`'):
    fingerprint.check_workdir(gated, wd)


def test_each_pretraining_run_follows_its_own_networks_scheme():
  """Section 4.2: backbone and gater are pretrained as their original papers
  train them; the gater's run does not inherit the backbone's scheme."""
  from configs import cifar10_densenet_bc100_k12, cifar10_r56  # pylint: disable=g-import-not-at-top
  from configs import cifar10_shakeshake26_2x96d, imagenet_inception_v4  # pylint: disable=g-import-not-at-top
  from configs import imagenet_r101  # pylint: disable=g-import-not-at-top

  def scheme(c):
    o = c.optimizer
    return (
        c.num_epochs,
        c.batch_size,
        o.name,
        o.learning_rate,
        o.schedule,
        tuple(o.lr_boundaries),
        o.nesterov,
        c.weight_decay,
        c.label_smoothing,
        c.aux_loss_weight,
    )

  resnet20 = (160, 128, 'sgd', 0.1, 'step', (80, 120), False, 1e-4, 0.0, 0.0)
  resnet18 = (90, 256, 'sgd', 0.1, 'step', (30, 60), False, 1e-4, 0.0, 0.0)
  for module, backbone_scheme, gater_scheme in (
      (
          cifar10_densenet_bc100_k12,
          (300, 64, 'sgd', 0.1, 'step', (150, 225), True, 1e-4, 0.0, 0.0),
          resnet20,
      ),
      (
          cifar10_shakeshake26_2x96d,
          (1800, 128, 'sgd', 0.2, 'cosine', (80, 120), True, 1e-4, 0.0, 0.0),
          resnet20,
      ),
      (cifar10_r56, resnet20, resnet20),
      (imagenet_r101, resnet18, resnet18),
  ):
    backbone, gater = recipe.pretraining_stages(module.get_config(), '/w')
    assert scheme(backbone.config) == backbone_scheme, module.__name__
    assert scheme(gater.config) == gater_scheme, module.__name__
    assert gater.config.model.backbone.depth in (18, 20)
  backbone, gater = recipe.pretraining_stages(
      imagenet_inception_v4.get_config(), '/w'
  )
  assert backbone.config.optimizer.name == 'rmsprop'
  assert backbone.config.aux_loss_weight == 0.4
  assert scheme(gater.config) == resnet18
  assert gater.config.data.image_size == 299  # the images the gater will see
  # A typo in the overrides is one sentence.
  config = cifar10_densenet_bc100_k12.get_config()
  config.pretrain.gater_overrides.num_epoch = 5
  with pytest.raises(train_lib.ConfigError, match='gater_overrides.num_epoch'):
    recipe.pretraining_stages(config, '/w')


@pytest.mark.parametrize(
    'field,value',
    [
        ('keep_checkpoints', 0),
        ('checkpoint_every_steps', 0),
        ('log_every_steps', -1),
        ('steps_per_call', 0),
        ('eval_every_epochs', 0.0),
    ],
)
def test_loop_fields_that_would_hang_or_lose_checkpoints_are_refused(
    tmp_path, field, value
):
  config = helpers.tiny_config(gated=False)
  config[field] = value
  with pytest.raises(train_lib.ConfigError, match=field):
    train_lib.train(
        config, str(tmp_path / 'run'), dataset=helpers.synthetic_dataset()
    )
  assert not os.path.exists(tmp_path / 'run')


def test_progress_eta_uses_the_mean_rate_after_the_first_report(caplog):
  from gaternet_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  progress = metrics_lib.ProgressLogger(1000, 10, every_secs=10.0)
  t0 = progress._last_t  # pylint: disable=protected-access
  with caplog.at_level('INFO'):
    assert not progress(5, t0 + 1.0)  # within the interval
    assert progress(100, t0 + 100.0)  # compile + 100 steps: 1/s
    assert progress(300, t0 + 110.0)  # a fast stretch: 20 steps/s
    assert progress(310, t0 + 120.0)  # a slow one (an eval): 1/s
  lines = [r.getMessage() for r in caplog.records if 'ETA' in r.getMessage()]
  assert lines[0].endswith('1.00 steps/s, 10 images/s, ETA 15m00s')
  assert lines[1].endswith('20.00 steps/s, 200 images/s, ETA 0m35s')
  # Mean since the first report: 210 steps in 20 s -> 690 left take 66 s.
  assert lines[2].endswith('1.00 steps/s, 10 images/s, ETA 1m06s')
  # It waits for the dispatched steps only when it reports.
  synced = []
  progress = metrics_lib.ProgressLogger(1000, 10, every_secs=3600.0)
  for step in range(1, 11):
    progress(step, sync=lambda: synced.append(True))
  assert not synced
  progress(1000, sync=lambda: synced.append(True))
  assert synced == [True]
