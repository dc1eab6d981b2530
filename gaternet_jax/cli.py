"""What main.py's modes do, and how their results are printed."""

from __future__ import annotations

import time
from typing import Any, Dict

import jax
import ml_collections

from gaternet_jax import config_checks
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import paths
from gaternet_jax.errors import UserError
from gaternet_jax.macs import format_macs

MODES = config_checks.MODES


def _gate_line(r: Dict[str, Any]) -> str:
  if 'gated_filters' not in r:
    return 'no gates (baseline)'
  return (
      f'{r["gates_on_fraction"]:.1%} of gates on; of '
      f'{r["gated_filters"]} gates {r["gates_always_on"]} always on, '
      f'{r["gates_always_off"]} always off, '
      f'{r["gates_input_dependent"]} input-dependent'
  )


def _macs_cell(r: Dict[str, Any]) -> str:
  """'1.3M (-74.9%)': mean conditional MACs per image and the change
  against the dense backbone; '' when the eval counted no MACs."""
  if 'macs_mean' not in r:
    return ''
  return f'{format_macs(r["macs_mean"])} ' f"({0.0 - r['macs_reduction']:+.1%})"


def print_training_report(results: Dict[str, Dict[str, Any]], seconds: float):
  """Baseline(s) vs gated accuracy (segmentation: mIoU and pixel
  accuracy), MACs per image and the gates, as a short table."""
  print()
  segmentation = any('miou' in r for r in results.values())
  score = (
      f'{"mIoU":>7} {"pixel acc":>9}' if segmentation else f'{"accuracy":>9}'
  )
  print(
      f'{"run":<18} {"split":<6} {score} {"loss":>8} '
      f'{"MACs/image":>16}  gates'
  )
  for name, r in results.items():
    label = 'final' if name == 'final' else f'pretrain:{name}'
    score = (
        f'{r["miou"]:>7.2%} {r["pixel_accuracy"]:>9.2%}'
        if segmentation
        else f'{r["accuracy"]:>9.2%}'
    )
    print(
        f'{label:<18} {r["split"]:<6} {score} '
        f'{r["loss"]:>8.4f} {_macs_cell(r):>16}  {_gate_line(r)}'
    )
  final = results.get('final', {})
  if 'macs_overhead' in final and final['macs_overhead'] > 0:
    print(
        f'MACs/image include {format_macs(final["macs_overhead"])} of '
        f'gating overhead over a {format_macs(final["macs_dense"])} dense '
        f'backbone; the gates save '
        f'{final["macs_backbone_reduction"]:.1%} of the backbone.'
    )
  print(f'wall time {metrics_lib.format_seconds(seconds)}')


def run(
    mode: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool = False,
) -> Any:
  """Runs `mode`; its last stdout line is one JSON object of the results
  (valid JSON: a NaN is written as null).

  `allow_config_change`: --mode=train may resume a workdir whose config
  changed the training trajectory (resume.py).

  Raises:
    UserError: for what the user can fix, an accelerator (or host) out of
      memory for the config's batch size included; a config value that
      cannot work is refused before anything loads.
  """
  config_checks.check(config, mode)
  config_checks.check_model(config)
  try:
    return _run(mode, config, workdir, allow_config_change)
  except (OSError, ValueError) as e:
    sentence = paths.disk_error(e)
    if sentence is None or isinstance(e, UserError):
      raise
    raise UserError(sentence) from e
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'Out of memory' not in message:
      raise
    first = message.strip().splitlines()[0][:200]
    raise UserError(
        f'{jax.devices()[0].device_kind} ran out of memory ({first}); use a '
        f'smaller batch: --config.batch_size and --config.eval_batch_size, '
        f'or --config.benchmark.batch_size for --mode=benchmark.'
    ) from e


def _run(
    mode: str,
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: bool,
) -> Any:
  if mode == 'summary':
    from gaternet_jax import summary  # pylint: disable=g-import-not-at-top

    out = summary.model_summary(config)
  elif mode == 'benchmark':
    from gaternet_jax import benchmark  # pylint: disable=g-import-not-at-top

    out = benchmark.run_benchmark(config)
    for name in ('baseline', 'gated'):
      if name in out:
        r = out[name]
        print(
            f'{name:<9} train {r["train_images_per_s"]:9.1f} images/s '
            f'(compile {r["train_compile_s"]:.1f}s)  eval '
            f'{r["eval_images_per_s"]:9.1f} images/s (compile '
            f'{r["eval_compile_s"]:.1f}s)'
        )
    if 'train_ratio' in out:
      print(
          f'baseline/gated images/s: train {out["train_ratio"]:.2f}x, '
          f'eval {out["eval_ratio"]:.2f}x'
      )
  elif mode == 'eval':
    from gaternet_jax import evaluation  # pylint: disable=g-import-not-at-top

    out = evaluation.evaluate(config, workdir)
    if out.get('unseen_gate_fraction'):
      print(
          f'{out["unseen_gate_fraction"]:.2%} of the images would have '
          'switched a gate that compaction removed or folded (they ran '
          'with the calibration pattern); compact with '
          "--config.compact.unseen='keep' or a larger calibration split to "
          'keep those filters.'
      )
  elif mode == 'train':
    from gaternet_jax import train  # pylint: disable=g-import-not-at-top

    t = time.time()
    out = train.train_and_evaluate(
        config, workdir, allow_config_change=allow_config_change
    )
    print_training_report(out, time.time() - t)
  elif mode == 'analyze':
    from gaternet_jax import analysis  # pylint: disable=g-import-not-at-top

    result = analysis.run_analysis(config, workdir)
    print(analysis.format_report(result))
    out = analysis.headline(result)
  elif mode == 'compact':
    from gaternet_jax import compact  # pylint: disable=g-import-not-at-top

    out = compact.run_compact(config, workdir)
    print(compact.format_report(out, config.compact.output))
  elif mode == 'speed':
    from gaternet_jax import speed  # pylint: disable=g-import-not-at-top

    out = speed.run_speed(config, workdir)
    print(speed.format_report(out))
  else:
    raise ValueError(mode)
  print(paths.dumps(out, sort_keys=True))
  return out
