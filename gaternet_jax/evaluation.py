"""Evaluation: eval batches through the jitted eval step, summed into
accuracy, loss, gate statistics and MACs; and the evaluation of a trained
workdir (`--mode=eval`)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gaternet_jax import checkpoints
from gaternet_jax import datasets
from gaternet_jax import experiment
from gaternet_jax import fingerprint
from gaternet_jax import macs as macs_lib
from gaternet_jax import recipe
from gaternet_jax import segmentation
from gaternet_jax import sharding
from gaternet_jax import steps as steps_lib
from gaternet_jax.errors import WorkdirError
from gaternet_jax.gates import GateSpec, gate_type_counts


def describe(x: np.ndarray) -> Dict[str, float]:
  """min, mean, max, std and the 10/50/90th percentiles of `x` (float64)."""
  x = np.asarray(x, np.float64)
  return {
      'min': float(x.min()),
      'mean': float(x.mean()),
      'max': float(x.max()),
      'std': float(x.std()),
      'p10': float(np.percentile(x, 10)),
      'p50': float(np.percentile(x, 50)),
      'p90': float(np.percentile(x, 90)),
  }


def summarize_macs(
    per_sample: np.ndarray, mac_counter: macs_lib.MacCounter
) -> Dict[str, float]:
  """Dense and conditional MACs per image, and the reductions.

  `macs_dense` is the ungated backbone's cost, `macs_overhead` what the
  gater (or gating modules) adds, `macs_mean` the mean conditional cost of
  the examples (overhead included) with its spread (`describe`'s figures),
  `macs_reduction` = 1 - macs_mean / macs_dense (what a user saves end to
  end), and `macs_backbone_reduction` the same without the overhead (what
  the gates save in the backbone).
  """
  stats = describe(per_sample)
  dense = float(mac_counter.dense_backbone)
  overhead = float(mac_counter.dense_gater)
  mean = stats['mean']
  return {
      'macs_dense': dense,
      'macs_overhead': overhead,
      **{
          f'macs_{k}': stats[k]
          for k in ('mean', 'std', 'min', 'max', 'p10', 'p50', 'p90')
      },
      'macs_reduction': 1.0 - mean / dense,
      'macs_backbone_reduction': 1.0 - (mean - overhead) / dense,
  }


def summarize_eval(
    sums: Mapping[str, Any],
    spec: GateSpec,
    per_sample_macs: Optional[np.ndarray] = None,
    mac_counter: Optional[macs_lib.MacCounter] = None,
) -> Dict[str, float]:
  """Turns summed eval outputs into the metrics an eval writes.

  Classification: 'accuracy' and 'loss'. Segmentation (the sums hold a
  'confusion' matrix): 'miou', 'pixel_accuracy' and 'mean_class_accuracy'
  of the whole split's pixels, each class's IoU as 'iou_class<k>' (absent
  for a class that never occurs), and 'loss', the images' mean pixel
  cross-entropy.
  """
  sums = jax.device_get(sums)
  n = float(sums['count'])
  if 'confusion' in sums:
    scores = segmentation.scores(sums['confusion'])
    out = {
        'miou': scores['miou'],
        'pixel_accuracy': scores['pixel_accuracy'],
        'mean_class_accuracy': scores['mean_class_accuracy'],
        'loss': float(sums['loss_sum']) / n,
        'num_examples': n,
    }
    width = len(str(len(scores['class_iou']) - 1))
    for k, iou in enumerate(scores['class_iou']):
      if iou is not None:
        out[f'iou_class{k:0{width}d}'] = iou
  else:
    out = {
        'accuracy': float(sums['correct']) / n,
        'loss': float(sums['loss_sum']) / n,
        'num_examples': n,
    }
  if spec:
    counts = np.asarray(sums['gate_on_counts'])
    kinds = gate_type_counts(counts, int(n), spec)['total']
    out.update(
        gate_l1=float(sums['gate_l1_sum']) / n,
        gates_on_fraction=float(counts.sum()) / (n * spec.total),
        gates_always_on=kinds['always_on'],
        gates_always_off=kinds['always_off'],
        gates_input_dependent=kinds['input_dependent'],
        gated_filters=spec.total,
    )
  if 'unseen_gate_images' in sums:
    out['unseen_gate_fraction'] = float(sums['unseen_gate_images']) / n
  if mac_counter is not None and per_sample_macs is not None:
    out.update(summarize_macs(per_sample_macs, mac_counter))
  return out


def run(
    steps: steps_lib.Steps,
    state: steps_lib.TrainState,
    batches: Iterable[Mapping[str, Any]],
) -> Dict[str, float]:
  """Accuracy, loss, gate statistics and MACs over padded eval batches."""
  total, macs = None, []
  for batch in batches:
    out = dict(
        steps.eval(state, sharding.to_global(batch, steps.data_sharding))
    )
    if 'macs_saved' in out:
      macs.append(out.pop('macs_saved'))
    total = (
        out if total is None else jax.tree_util.tree_map(jnp.add, total, out)
    )
  assert total is not None, 'no eval batches'
  per_sample = None
  if macs:
    assert steps.mac_counter is not None
    saved = np.concatenate(
        [np.asarray(m, np.float64) for m in jax.device_get(macs)]
    )
    # float64 on the host: exact for any network size.
    per_sample = steps.mac_counter.dense_total - saved[saved >= 0]
  return summarize_eval(total, steps.spec, per_sample, steps.mac_counter)


def eval_weights(
    config: ml_collections.ConfigDict,
    workdir: str,
    purpose: str = 'evaluate',
    dataset: Optional[datasets.Dataset] = None,
) -> str:
  """Where the weights to evaluate come from: 'checkpoint' (the latest
  intact one of `workdir`, whose run must have built `config`'s network
  on its dataset: fingerprint.check_workdir) or 'official'
  (`config.init.official_checkpoint`); checked before any data is loaded."""
  if checkpoints.has_checkpoint(workdir):
    fingerprint.check_workdir(config, workdir, dataset)
    return 'checkpoint'
  if recipe.official_checkpoint(config):
    return 'official'
  raise WorkdirError(
      f'{workdir} has no checkpoint to {purpose}; train it '
      f'first with --mode=train (or set '
      f'config.init.official_checkpoint).'
  )


def restore_for_eval(
    config: ml_collections.ConfigDict,
    workdir: str,
    model: Any,
    image_shape,
    mesh,
    source: str,
) -> steps_lib.TrainState:
  """A replicated state holding the weights `eval_weights` named.

  Only the parameters, BatchNorm statistics and step are read, so the run
  may have been trained with another optimiser (a pretraining stage, say).
  """
  state = steps_lib.create_train_state(
      config,
      model,
      image_shape,
      lambda _: 0.0,
      jax.random.key(config.seed),
      mesh,
  )
  if source == 'checkpoint':
    saved = checkpoints.load_variables(workdir)
    params = checkpoints.graft(
        {'root': state.params},
        ('root',),
        saved['params'],
        f'model in {workdir}',
    )
    stats = checkpoints.graft(
        {'root': state.batch_stats},
        ('root',),
        saved['batch_stats'],
        f'BatchNorm statistics in {workdir}',
    )
    state = state.replace(
        step=jnp.asarray(saved['step'], jnp.int32),
        params=params['root'],
        batch_stats=stats['root'],
    )
  else:
    state = recipe.official_init(config)(state)
  return sharding.replicate(state, mesh)


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Optional[datasets.Dataset] = None,
) -> Dict[str, Any]:
  """Evaluates the latest intact checkpoint of `workdir` (or, when it has
  none, `config.init.official_checkpoint`) on the config's test split."""
  source = eval_weights(config, workdir, dataset=dataset)
  exp = experiment.setup(config, dataset)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  state = restore_for_eval(
      config, workdir, exp.model, exp.image_shape, exp.mesh, source
  )
  ds = exp.ds
  assert ds is not None  # setup() loaded it.
  results: Dict[str, Any] = dict(
      run(exp.steps(), state, ds.eval_batches(config.eval_batch_size)),
      step=int(state.step),
      split=ds.test_split_name,
  )
  if source == 'checkpoint':
    # The evaluated step's, not the latest (which may be corrupt).
    results['train_seconds'] = checkpoints.train_seconds(
        workdir, step=results['step']
    )
  return results
