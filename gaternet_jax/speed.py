"""`--mode=speed`: do the gates save time? Inference latency and throughput
of four ways to run a gated network, each next to its MAC reduction.

- dense:     the ungated backbone (every filter, no gates): the reference;
- masked:    the gated model as trained, which computes every channel and
             multiplies the closed ones by 0;
- compacted: the smaller network of `--mode=compact` (models/compaction.py),
             its always-off filters removed;
- dynamic:   dynamic execution (dynamic.py), each input computing only its
             open channels.

Latency is at batch 1, throughput at `speed.batch_size` (0: eval_batch_size).
A GaterNet's gater runs before any of the backbones and costs the same for
all of them; it is timed on its own (`gater_*`) and left out of the
backbones' rows and MACs. Batch-shaping's gating modules live in the units
and count in the masked, compacted and dynamic rows.

Without a trained workdir, gates are drawn at random, per image at each
density of `speed.densities` for the masked and dynamic rows, and per
filter (the same for every image) for the compacted row: that gives the
speedup curve of a network without training one. With a trained workdir,
one more row uses the model's own gates on the first test images (the
compacted network then keeps the gates those images use).

Each row times the four networks in turns (dense, masked, compacted,
dynamic, then again), so that whatever else the machine does falls on all
of them alike; its `speedup`s are the dense median time over each one's;
`mac_speedup` is the dense MACs over its MACs per image; `ratio` is
speedup / mac_speedup (1: the MACs saved show up fully as time).
"""

from __future__ import annotations

import statistics
import time
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gaternet_jax import augment
from gaternet_jax import compact
from gaternet_jax import dynamic
from gaternet_jax import evaluation
from gaternet_jax import experiment
from gaternet_jax import gating
from gaternet_jax import macs as macs_lib
from gaternet_jax.gates import GateSpec, Gates, is_on
from gaternet_jax.models import create_model
from gaternet_jax.models.compaction import Compaction

WAYS = ('dense', 'masked', 'compacted', 'dynamic')


def _median_seconds(
    calls: Mapping[str, Tuple[Callable[..., Any], Sequence[tuple]]],
    runs: int,
    warmup: int,
) -> Dict[str, float]:
  """Median wall time of each `fn(*args)`, {name: (fn, args_list)}.

  The calls take turns (run i calls every function on its args_list[i],
  modulo its length), so that whatever else the machine does falls on all
  of them alike; first `warmup` calls each (compilation included).
  """
  for fn, args_list in calls.values():
    for _ in range(max(warmup, 1)):
      jax.block_until_ready(fn(*args_list[0]))
  times: Dict[str, List[float]] = {name: [] for name in calls}
  for i in range(runs):
    for name, (fn, args_list) in calls.items():
      args = args_list[i % len(args_list)]
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(t) for name, t in times.items()}


def _init(model, image_shape, seed: int):
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return jax.jit(
      lambda: model.init(
          {'params': jax.random.key(seed), 'gates': jax.random.key(seed + 1)},
          x,
          train=False,
      )
  )()


def _backbone_only(model):
  """`(variables, images, gates) -> logits` of the model's backbone."""

  def run(module, images, gates):
    return module.backbone(images, gates, train=False)[0]

  return jax.jit(lambda v, x, g: model.apply(v, x, g, method=run))


def _random_gates(spec: GateSpec, batch: int, density: float, rng) -> Gates:
  return {
      name: jnp.asarray(rng.random((batch, n)) < density, jnp.float32)
      for name, n in spec.sites
  }


def _static_pattern(spec: GateSpec, on: np.ndarray) -> Compaction:
  """A compaction with `on` `(total,)` gates always on, the rest off."""
  return Compaction.from_on_counts(spec, on.astype(np.int64), 1)


def _mean_macs(counter: macs_lib.MacCounter, gates: Gates, gater: bool):
  """Mean MACs per image of the backbone (a gater's cost left out)."""
  saved = np.asarray(counter.saved_per_sample(gates), np.float64)
  total = counter.dense_backbone + (0 if gater else counter.dense_gater)
  return float(np.mean(total - saved))


def _images(rng, batch: int, image_shape) -> jax.Array:
  return jnp.asarray(
      rng.normal(size=(batch,) + tuple(image_shape)), jnp.float32
  )


class _Bench:
  """The networks of one config, and how to time them."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Optional[str]):
    self.config = config
    self.exp = experiment.setup(
        config, load_data=bool(workdir), count_macs=False
    )
    self.model = self.exp.model
    dynamic.check_supported(self.model, 'dynamic execution')
    self.spec = self.exp.spec
    self.gater = self.model.gating == gating.GATER
    self.image_shape = self.exp.image_shape
    self.counter = macs_lib.count(self.model, self.image_shape)
    sp = config.speed
    self.rng = np.random.default_rng(sp.seed)
    self.batch = config.speed.batch_size or config.eval_batch_size
    self.runs, self.warmup = sp.runs, sp.warmup
    if workdir:
      state = evaluation.restore_for_eval(
          config,
          workdir,
          self.model,
          self.image_shape,
          self.exp.mesh,
          'checkpoint',
      )
      self.variables = jax.device_get(
          {'params': state.params, 'batch_stats': state.batch_stats}
      )
    else:
      self.variables = jax.device_get(
          _init(self.model, self.image_shape, sp.seed)
      )
    self.dense_model = create_model(
        gating.ungated(config).model, self.exp.num_classes
    )
    self.dense_vars = _init(self.dense_model, self.image_shape, sp.seed)
    self.dense_macs = float(self.counter.dense_backbone)
    self.one = [
        (_images(self.rng, 1, self.image_shape),) for _ in range(self.runs)
    ]
    self.many = _images(self.rng, self.batch, self.image_shape)
    self.dense_fn = jax.jit(
        lambda v, x: self.dense_model.apply(v, x, train=False)[0]
    )
    self.masked_fn = _backbone_only(self.model)
    self.dynamic_fn = jax.jit(
        lambda v, x, g: dynamic.backbone_apply(
            self.model, v, x, g, sp.num_buckets, sp.per_input_batch
        )[0]
    )

  def gater_cost(self) -> Dict[str, float]:
    fn = jax.jit(
        lambda v, x: dynamic.gater_gates(self.model, v, x)  # pylint: disable=unnecessary-lambda
    )
    one = _median_seconds(
        {'gater': (fn, [(self.variables, x) for (x,) in self.one])},
        self.runs,
        self.warmup,
    )
    many = _median_seconds(
        {'gater': (fn, [(self.variables, self.many)])}, self.runs, self.warmup
    )
    return {
        'latency_ms': 1e3 * one['gater'],
        'images_per_s': self.batch / many['gater'],
        'macs': float(self.counter.dense_gater),
    }

  def own_gates(self, images: jax.Array) -> Gates:
    """The trained model's evaluation gates of `images`."""
    _, out = jax.jit(lambda v, x: self.model.apply(v, x, train=False))(
        self.variables, images
    )
    return out['gates']

  def row(
      self,
      one_gates: List[Gates],
      many_gates: Gates,
      static_on: np.ndarray,
      one_images: Optional[List[jax.Array]] = None,
      many_images: Optional[jax.Array] = None,
  ) -> Dict[str, Dict[str, float]]:
    """Dense, masked, compacted and dynamic figures for one set of gates,
    timed in turns."""
    ones = one_images or [x for (x,) in self.one]
    many = self.many if many_images is None else many_images
    macs = float(
        np.mean([_mean_macs(self.counter, g, self.gater) for g in one_gates])
    )
    small_fn, small_args, small_macs = self._compacted(static_on)
    one_calls = {
        'dense': (self.dense_fn, [(self.dense_vars, x) for x in ones]),
        'masked': (
            self.masked_fn,
            [(self.variables, x, g) for x, g in zip(ones, one_gates)],
        ),
        'compacted': (small_fn, [small_args(x) for x in ones]),
        'dynamic': (
            self.dynamic_fn,
            [(self.variables, x, g) for x, g in zip(ones, one_gates)],
        ),
    }
    many_calls = {
        'dense': (self.dense_fn, [(self.dense_vars, many)]),
        'masked': (self.masked_fn, [(self.variables, many, many_gates)]),
        'compacted': (small_fn, [small_args(many)]),
        'dynamic': (self.dynamic_fn, [(self.variables, many, many_gates)]),
    }
    one = _median_seconds(one_calls, self.runs, self.warmup)
    batch = _median_seconds(many_calls, self.runs, self.warmup)
    all_macs = {
        'dense': self.dense_macs,
        'masked': macs,
        'compacted': small_macs,
        'dynamic': macs,
    }
    return {
        way: {
            'latency_ms': 1e3 * one[way],
            'images_per_s': self.batch / batch[way],
            'macs': all_macs[way],
        }
        for way in one_calls
    }

  def _compacted(self, static_on: np.ndarray):
    """(fn, args of images, MACs) of the network `static_on` compacts to."""
    compaction = _static_pattern(self.spec, static_on)
    config = compact.compacted_config(self.config, compaction)
    model = create_model(config.model, self.exp.num_classes)
    variables = compact.compact_variables(
        self.model, self.variables, compaction
    )
    counter = macs_lib.count(model, self.image_shape, conditional=False)
    if self.gater:
      return (
          _backbone_only(model),
          lambda x: (variables, x, {}),
          float(counter.dense_backbone),
      )
    return (
        jax.jit(lambda v, x: model.apply(v, x, train=False)[0]),
        lambda x: (variables, x),
        float(counter.dense_backbone + counter.dense_gater),
    )


def _ratios(row: Dict[str, Dict[str, float]]):
  """Speedups over the row's dense timing, and their ratio to the MAC
  speedups."""
  dense = row['dense']
  for r in row.values():
    r['mac_speedup'] = dense['macs'] / r['macs']
    r['latency_speedup'] = dense['latency_ms'] / r['latency_ms']
    r['throughput_speedup'] = r['images_per_s'] / dense['images_per_s']
    r['latency_ratio'] = r['latency_speedup'] / r['mac_speedup']
    r['throughput_ratio'] = r['throughput_speedup'] / r['mac_speedup']


def run_speed(
    config: ml_collections.ConfigDict, workdir: Optional[str] = None
) -> Dict[str, Any]:
  """The figures of the module docstring: {'dense', 'gater' (GaterNet),
  'rows': {label: {way: figures}}, ...}."""
  trained = bool(workdir)
  if trained:
    # A workdir without a checkpoint (or of another model) is one sentence.
    evaluation.eval_weights(config, workdir, purpose='time')
  bench = _Bench(config, workdir if trained else None)
  result: Dict[str, Any] = {
      'device': jax.devices()[0].device_kind,
      'batch_size': bench.batch,
      'gating': bench.model.gating,
      'image_shape': list(bench.image_shape),
      'dense_macs': bench.dense_macs,
      'num_buckets': config.speed.num_buckets,
      'per_input_batch': config.speed.per_input_batch,
      'trained': trained,
  }
  t = time.time()
  if bench.gater:
    result['gater'] = bench.gater_cost()
  rows = {}
  if trained:
    ds = bench.exp.ds
    assert ds is not None
    batch = next(iter(ds.eval_batches(bench.batch)))
    images = augment.preprocess(
        jnp.asarray(batch['image']), mean=bench.exp.mean, std=bench.exp.std
    )
    gates = bench.own_gates(images)
    want = bench.masked_fn(bench.variables, images, gates)
    got = bench.dynamic_fn(bench.variables, images, gates)
    scale = jnp.maximum(jnp.max(jnp.abs(want), axis=-1), 1e-30)
    result['dynamic_max_relative_error'] = float(
        jnp.max(jnp.max(jnp.abs(got - want), axis=-1) / scale)
    )
    n = min(bench.runs, images.shape[0])
    one_gates = [{k: v[i : i + 1] for k, v in gates.items()} for i in range(n)]
    on = np.asarray(is_on(bench.spec.flatten(gates)))
    static_on = on.any(axis=0)  # The gates these images use.
    rows['trained'] = bench.row(
        one_gates,
        gates,
        static_on,
        [images[i : i + 1] for i in range(n)],
        images,
    )
    logging.info('Timed the trained gates (%.0fs so far).', time.time() - t)
  for density in config.speed.densities:
    one_gates = [
        _random_gates(bench.spec, 1, density, bench.rng)
        for _ in range(bench.runs)
    ]
    many_gates = _random_gates(bench.spec, bench.batch, density, bench.rng)
    static_on = bench.rng.random(bench.spec.total) < density
    rows[f'{density:.0%}'] = bench.row(one_gates, many_gates, static_on)
    logging.info(
        'Timed %.0f%% of gates on (%.0fs so far).',
        100 * density,
        time.time() - t,
    )
  for row in rows.values():
    _ratios(row)
  result['rows'] = rows
  result['dense'] = {
      key: statistics.median(row['dense'][key] for row in rows.values())
      for key in ('latency_ms', 'images_per_s', 'macs')
  }
  return result


def format_report(result: Mapping[str, Any]) -> str:
  """The speed table: per gate density and way, latency and throughput
  speedups over the dense backbone next to the MAC speedup."""
  fmt = macs_lib.format_macs
  d = result['dense']
  lines = [
      f'{result["device"]}, images {tuple(result["image_shape"])}; dense '
      f'backbone {fmt(d["macs"])} MACs: {d["latency_ms"]:.2f} ms at batch 1, '
      f'{d["images_per_s"]:.1f} images/s at batch {result["batch_size"]} '
      '(medians; each row is timed against its own dense runs).',
  ]
  if 'gater' in result:
    g = result['gater']
    lines.append(
        f'gater (runs first, for every way): {fmt(g["macs"])} MACs, '
        f'{g["latency_ms"]:.2f} ms at batch 1, {g["images_per_s"]:.1f} '
        'images/s; left out below.'
    )
  lines.append(
      f'{"gates on":<9}{"way":<10}{"MACs":>8}{"MAC x":>7}'
      f'{"ms b=1":>9}{"x":>6}{"ratio":>7}{"img/s":>10}{"x":>6}{"ratio":>7}'
  )
  for label, row in result['rows'].items():
    for way in WAYS:
      r = row[way]
      lines.append(
          f'{label:<9}{way:<10}{fmt(r["macs"]):>8}{r["mac_speedup"]:>7.2f}'
          f'{r["latency_ms"]:>9.2f}{r["latency_speedup"]:>6.2f}'
          f'{r["latency_ratio"]:>7.2f}{r["images_per_s"]:>10.1f}'
          f'{r["throughput_speedup"]:>6.2f}{r["throughput_ratio"]:>7.2f}'
      )
  lines.append(
      'x: speedup over the dense backbone; ratio: speedup / MAC speedup.'
  )
  if 'dynamic_max_relative_error' in result:
    lines.append(
        'dynamic execution on the trained gates: largest relative logit '
        f'error {result["dynamic_max_relative_error"]:.1e} against the '
        'masked model.'
    )
  return '\n'.join(lines)
