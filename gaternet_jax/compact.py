"""`--mode=compact`: a trained gated model made into the smaller network its
constant gates imply, written as a new workdir.

1. Calibrate: the trained model's gates on every image of the calibration
   split say which gates are always on, always off or input-dependent
   (`models/compaction.py`).
2. Compact: the always-off gates' filters are removed (the conv's output
   channels, their BN entries and, for local gates, the next conv's input
   slices), the always-on gates folded; the weights are gathered from the
   trained ones (`compact_variables`).
3. Verify: on every calibration image the compacted model's logits equal
   the trained model's within `compact.tolerance` (relative to the image's
   largest logit) and its gates, with the constants put back, are the same.
   Nothing is written otherwise.
4. Write `compact.output`: config.json (the config with
   `model.compaction`), a checkpoint at the trained step, compaction.json
   (the counts and checks below) and config.py, which loads config.json,
   so `--config=<output>/config.py --workdir=<output>` evaluates, analyses
   or benchmarks the compacted model like any run.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Mapping, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gaternet_jax import analysis
from gaternet_jax import augment
from gaternet_jax import checkpoints
from gaternet_jax import data as data_lib
from gaternet_jax import dynamic
from gaternet_jax import evaluation
from gaternet_jax import experiment
from gaternet_jax import macs as macs_lib
from gaternet_jax import paths
from gaternet_jax import resume
from gaternet_jax import steps as steps_lib
from gaternet_jax import summary
from gaternet_jax.errors import ConfigError, UserError, WorkdirError
from gaternet_jax.gates import is_on
from gaternet_jax.models import create_model
from gaternet_jax.models.compaction import Compaction

CONFIG_PY = '''"""The config of a compacted model, written by --mode=compact: the
config.json beside this file (use --config=<this file>)."""

import json
import os

import ml_collections


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.json')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
'''


def compact_variables(
    model: Any, variables: Mapping[str, Any], compaction: Compaction
) -> Dict[str, Any]:
  """The compacted model's variables, gathered from the trained ones.

  Per unit, the gated conv keeps the output channels of its site's kept
  gates (input-dependent first, then always-on), its BN the same entries,
  and, for local gates, the next conv the same input channels; a gater's
  unit whose every gate is off keeps only its shortcut. Everything else is
  copied.
  """
  out = {
      col: dict(tree, backbone=dict(tree['backbone']))
      for col, tree in variables.items()
  }
  for plan in dynamic.unit_plans(model.backbone):
    site = compaction.site(plan.name)
    index = np.asarray(site.channels, np.int32)
    step = plan.steps[plan.gated]
    for tree in out.values():
      if plan.name not in tree['backbone']:
        continue
      unit = dict(tree['backbone'][plan.name])
      if not plan.local and site.width == 0:
        # The shortcut alone, and what it reads.
        keep = {'shortcut_conv', 'shortcut_bn'} if plan.projection else set()
        if plan.projection and plan.pre_norm:
          keep.add(plan.pre_norm)
        unit = {k: v for k, v in unit.items() if k in keep}
      else:
        if step.conv in unit:
          if site.width == 0:
            del unit[step.conv]
          else:
            unit[step.conv] = {'kernel': unit[step.conv]['kernel'][..., index]}
        if step.norm in unit:
          unit[step.norm] = {k: v[index] for k, v in unit[step.norm].items()}
        if plan.local:
          reader = plan.steps[plan.gated + 1].conv
          if reader in unit and site.width == 0:
            del unit[reader]  # It reads no channel: zeros.
          elif reader in unit:
            unit[reader] = {'kernel': unit[reader]['kernel'][:, :, index, :]}
      if unit:
        tree['backbone'][plan.name] = unit
      else:  # An identity shortcut and no branch: no variables left.
        del tree['backbone'][plan.name]
  return out


def compacted_config(
    config: ml_collections.ConfigDict, compaction: Compaction
) -> ml_collections.ConfigDict:
  """`config` with `model.compaction` set (the compacted model's)."""
  out = ml_collections.ConfigDict(resume.as_json(config))
  out.model.compaction = compaction.text()
  out.compact.output = ''
  out.init.official_checkpoint = ''
  return out


def _check_output(workdir: str, output: str):
  """Refuses an output that is the trained workdir or already holds files
  (a workdir is never overwritten)."""
  source, target = paths.resolve(workdir), paths.resolve(output)
  if str(source).rstrip('/') == str(target).rstrip('/'):
    raise WorkdirError(
        f'config.compact.output {output} is the trained --workdir; choose a '
        'new directory for the compacted model.'
    )
  if target.is_dir() and any(target.iterdir()):
    raise WorkdirError(
        f'config.compact.output {output} already holds files; choose a new '
        'directory (a workdir is never overwritten).'
    )
  paths.check_writable(output)


def _relative_error(logits: jax.Array, reference: jax.Array) -> jax.Array:
  """Per image: max |difference| / max |reference logit|."""
  scale = jnp.maximum(jnp.max(jnp.abs(reference), axis=-1), 1e-30)
  return jnp.max(jnp.abs(logits - reference), axis=-1) / scale


def _batches(ds, config, split: str) -> Tuple[Iterable[Any], str, int]:
  batch_size = config.compact.batch_size or config.eval_batch_size
  return analysis.split_batches(ds, split, batch_size)


def run_compact(
    config: ml_collections.ConfigDict, workdir: str
) -> Dict[str, Any]:
  """Calibrates, compacts, verifies and writes `config.compact.output`.

  Returns the figures compaction.json holds: the gate counts, params and
  dense MACs before and after, and the verification (images, the largest
  relative logit error, gate mismatches).
  """
  if jax.process_count() > 1:
    raise UserError('--mode=compact runs in one process; start it alone.')
  if not config.compact.output:
    # Like --workdir, no config file holds it: it is asked for here.
    raise ConfigError(
        '--mode=compact writes a new workdir: give its path with '
        '--config.compact.output=...'
    )
  _, num_classes = data_lib.dataset_info(config.data)
  model = create_model(config.model, num_classes)
  dynamic.check_supported(model, 'compaction')
  if model.backbone.compaction is not None:
    raise UserError(
        'this model is compacted already (config.model.compaction is set).'
    )
  output = config.compact.output
  _check_output(workdir, output)
  source = evaluation.eval_weights(config, workdir, purpose='compact')
  exp = experiment.setup(config)
  model = exp.model
  state = evaluation.restore_for_eval(
      config, workdir, model, exp.image_shape, exp.mesh, source
  )
  variables = jax.device_get(
      {'params': state.params, 'batch_stats': state.batch_stats}
  )
  mean, std = exp.mean, exp.std
  spec = exp.spec
  ds = exp.ds
  assert ds is not None

  def forward(m):
    def run(v, images):
      logits, out = m.apply(
          v, augment.preprocess(images, mean=mean, std=std), train=False
      )
      return logits, out['gates'], out.get('unseen_gates')

    return jax.jit(run)

  trained = forward(model)
  t0 = time.time()
  on_counts = np.zeros(spec.total, np.int64)
  num = 0
  batches, split_name, _ = _batches(ds, config, config.compact.split)
  for batch in batches:
    _, gates, _ = trained(variables, batch['image'])
    valid = np.asarray(batch['mask']) > 0
    on = np.asarray(is_on(spec.flatten(gates)))[valid]
    on_counts += on.sum(axis=0)
    num += int(valid.sum())
  compaction = Compaction.from_on_counts(
      spec, on_counts, num, keep_off=config.compact.unseen == 'keep'
  )
  kinds = compaction.summary()
  logging.info(
      'Calibrated on %d %s images in %.1fs: %s.',
      num,
      split_name,
      time.time() - t0,
      kinds,
  )

  new_config = compacted_config(config, compaction)
  new_model = create_model(new_config.model, exp.num_classes)
  new_variables = compact_variables(model, variables, compaction)
  _, shapes = macs_lib.count_with_variables(
      new_model, exp.image_shape, conditional=False
  )
  _check_shapes(new_variables, shapes)

  compacted = forward(new_model)
  worst, mismatched, unseen_images = 0.0, 0, 0
  batches, _, _ = _batches(ds, config, config.compact.split)
  for batch in batches:
    valid = np.asarray(batch['mask']) > 0
    ref_logits, ref_gates, _ = trained(variables, batch['image'])
    logits, gates, unseen = compacted(new_variables, batch['image'])
    error = np.asarray(_relative_error(logits, ref_logits))[valid]
    worst = max(worst, float(error.max(initial=0.0)))
    full = compaction.expand(gates, len(valid))
    same = np.all(
        np.asarray(is_on(spec.flatten(full)))
        == np.asarray(is_on(spec.flatten(ref_gates))),
        axis=-1,
    )
    mismatched += int(np.sum(~same[valid]))
    if unseen is not None:
      unseen_images += int(np.sum(np.asarray(unseen)[valid] > 0))
  tolerance = float(config.compact.tolerance)
  if worst > tolerance or mismatched or unseen_images:
    raise UserError(
        f'the compacted model differs from the trained one on the '
        f'calibration split (largest relative logit error {worst:.2e}, '
        f'tolerance {tolerance:g}; {mismatched} images with other gates); '
        'nothing was written.'
    )

  # A compacted config's summary holds the uncompacted network's counts.
  after = summary.model_summary(new_config)
  report = {
      'source_workdir': str(workdir),
      'step': int(state.step),
      'calibration_split': split_name,
      'calibration_images': num,
      'unseen': config.compact.unseen,
      'gates': kinds,
      'params_before': after['params_uncompacted'],
      'params_after': after['params_total'],
      'macs_backbone_before': after['macs_backbone_uncompacted'],
      'macs_backbone_after': after['macs_backbone'],
      'macs_gater': after['macs_gater'],
      'max_relative_logit_error': worst,
      'gate_mismatches': mismatched,
  }
  _write(output, new_config, new_model, new_variables, exp, state, report)
  return report


def _check_shapes(variables: Any, shapes: Any):
  """The gathered variables have the compacted model's structure."""
  got = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), variables)
  want = jax.tree_util.tree_map(lambda a: tuple(a.shape), dict(shapes))
  assert got == want, 'compacted variables do not match the compacted model'


def _write(output, config, model, variables, exp, state, report):
  """config.json, the checkpoint, compaction.json and config.py."""
  new_state = steps_lib.create_train_state(
      config,
      model,
      exp.image_shape,
      lambda _: 0.0,
      jax.random.key(config.seed),
      exp.mesh,
  )
  new_state = new_state.replace(
      step=state.step,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
  )
  paths.write_json(paths.join(output, 'config.json'), resume.as_json(config))
  ckpt = checkpoints.Checkpointer(output)
  try:
    ckpt.save(int(state.step), new_state, force=True, train_seconds=0.0)
  finally:
    ckpt.close()
  paths.write_json(paths.join(output, 'compaction.json'), report)
  paths.write_text(paths.join(output, 'config.py'), CONFIG_PY)


def format_report(report: Mapping[str, Any], output: str) -> str:
  """The compaction's before/after table and how to use the result."""
  g = report['gates']
  fmt = macs_lib.format_macs
  lines = [
      f'Calibrated on {report["calibration_images"]} '
      f'{report["calibration_split"]} images: {g["always_on"]} gates always '
      f'on (folded), {g["always_off"]} always off (filters removed), '
      f'{g["input_dependent"]} input-dependent (kept).',
      f'{"":<22}{"before":>12}{"after":>12}{"change":>9}',
  ]
  for label, a, b in (
      ('params', report['params_before'], report['params_after']),
      (
          'dense backbone MACs',
          report['macs_backbone_before'],
          report['macs_backbone_after'],
      ),
  ):
    lines.append(f'{label:<22}{fmt(a):>12}{fmt(b):>12}{b / a - 1:>+9.1%}')
  lines.append(
      f'Verified on every calibration image: largest relative logit error '
      f'{report["max_relative_logit_error"]:.1e}, gates identical.'
  )
  lines.append(
      f'Evaluate it: python main.py --config={output}/config.py '
      f'--workdir={output} --mode=eval'
  )
  return '\n'.join(lines)
