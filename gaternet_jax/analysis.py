"""What the gates learned: GaterNet's section 4.2.1 and Appendix A as a mode.

`run_analysis(config, workdir)` restores a trained workdir, streams one
split through the model (`config.analysis`) and writes the numbers to
`<workdir>/analysis/analysis.json` and the figures next to them (PNGs, and
TensorBoard images when TensorFlow is installed). It writes nothing outside
`<workdir>/analysis/`, and a re-run replaces the files it wrote there.

Memory grows with samples x gates as bits: each sample's binary gate vector
is kept packed (`np.packbits`, 8 gates a byte; 50,000 x 47,872 gates is
0.3 GB), while per-gate on-counts and per-class sums accumulate batch by
batch. The statistics are pure functions of those arrays, so they can be
checked on hand-built gate matrices.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from gaternet_jax import batching
from gaternet_jax import macs as macs_lib
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import paths as paths_lib
from gaternet_jax import segmentation
from gaternet_jax import sharding
from gaternet_jax import evaluation
from gaternet_jax import experiment
from gaternet_jax import steps as steps_lib
from gaternet_jax.errors import ConfigError, WorkdirError
from gaternet_jax.evaluation import describe
from gaternet_jax.gates import GateSpec, gate_type_counts, is_on

OUT_DIR = 'analysis'
JSON_NAME = 'analysis.json'
# The figures, by what they show (file names in <workdir>/analysis/).
FIGURES = {
    'gate_types_fraction': 'gate_types_fraction.png',  # GaterNet Figure 2
    'gate_types_count': 'gate_types_count.png',  # Figure 6
    'on_count_histogram': 'on_count_histogram.png',  # Figure 3
    'per_sample_cost': 'per_sample_cost.png',  # Figure 4
    'tsne': 'tsne.png',  # Figure 5
    'cost_vs_difficulty': 'cost_vs_difficulty.png',
    'class_mean_gates': 'class_mean_gates.png',
}
# What a segmentation run's analysis draws besides.
SEGMENTATION_FIGURES = {'cost_vs_iou': 'cost_vs_iou.png'}
_ALL_FIGURES = {**FIGURES, **SEGMENTATION_FIGURES}
KINDS = ('always_on', 'always_off', 'input_dependent')


# ---------------------------------------------------------------------------
# Statistics of a gate matrix (pure functions of numpy arrays).


def pack_gates(gates: np.ndarray) -> np.ndarray:
  """`(n, total)` 0/1 gates -> `(n, ceil(total / 8))` uint8 bits."""
  return np.packbits(is_on(np.asarray(gates)), axis=-1)


def unpack_gates(bits: np.ndarray, total: int) -> np.ndarray:
  """Inverse of `pack_gates`: `(n, total)` uint8 zeros and ones."""
  return np.unpackbits(bits, axis=-1, count=total)


def gate_type_rows(
    on_counts: np.ndarray, num_samples: int, spec: GateSpec
) -> List[Dict[str, Any]]:
  """Per gated site, in depth order: its gates always on, always off and
  input-dependent over `num_samples` samples, as counts and fractions.

  Args:
    on_counts: `(spec.total,)` samples for which each gate was on.
    num_samples: the samples the counts are over.
    spec: the sites the counts are laid out by.
  """
  kinds = gate_type_counts(on_counts, num_samples, spec)
  rows = []
  for name, n in spec:
    row = {'site': name, 'gates': n}
    row.update(kinds[name])
    row.update({f'{k}_fraction': kinds[name][k] / n for k in KINDS})
    rows.append(row)
  return rows


def site_groups(names: Sequence[str]) -> List[Tuple[str, List[int]]]:
  """Sites grouped into stages by the first `_`-separated token of their
  names ('stage1_block2' -> 'stage1'), in depth order; each site is its own
  group when that yields a single group (Inception's 'Mixed_5b')."""
  groups: Dict[str, List[int]] = {}
  for i, name in enumerate(names):
    groups.setdefault(name.split('_', 1)[0], []).append(i)
  if len(groups) < 2:
    return [(name, [i]) for i, name in enumerate(names)]
  return list(groups.items())


def group_rows(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
  """`gate_type_rows` summed over the stages of `site_groups`."""
  out = []
  for group, idx in site_groups([r['site'] for r in rows]):
    gates = sum(rows[i]['gates'] for i in idx)
    row = {'group': group, 'sites': len(idx), 'gates': gates}
    for k in KINDS:
      row[k] = sum(rows[i][k] for i in idx)
      row[f'{k}_fraction'] = row[k] / gates
    out.append(row)
  return out


def input_dependent_on_counts(
    on_counts: np.ndarray, num_samples: int
) -> np.ndarray:
  """The on-counts of the gates that are neither always on nor always off."""
  on_counts = np.asarray(on_counts)
  return on_counts[(on_counts > 0) & (on_counts < num_samples)]


def on_count_histogram(
    on_counts: np.ndarray, num_samples: int, bins: int
) -> Dict[str, List[float]]:
  """Histogram of the on-counts of the input-dependent gates (GaterNet
  Figure 3): `bins` equal-width bins over [1, num_samples - 1]."""
  dep = input_dependent_on_counts(on_counts, num_samples)
  counts, edges = np.histogram(
      dep, bins=bins, range=(1, max(num_samples - 1, 2))
  )
  return {
      'bin_edges': [float(e) for e in edges],
      'counts': [int(c) for c in counts],
  }


def frequent_gates(
    on_counts: np.ndarray, num_samples: int, low: float, high: float
) -> int:
  """Input-dependent gates on for between `low` and `high` (fractions,
  inclusive) of the samples: the paper's 100 ~ 9,900 of 10,000."""
  dep = input_dependent_on_counts(on_counts, num_samples)
  return int(np.sum((dep >= low * num_samples) & (dep <= high * num_samples)))


def knn_label_agreement(
    x: np.ndarray, labels: np.ndarray, k: int, chunk: int = 512
) -> Tuple[float, float]:
  """How often a sample's nearest gate vectors share its label, vs chance.

  Distances are squared Euclidean, which on binary vectors is the Hamming
  distance. Each sample's k nearest other samples vote; ties at the k-th
  distance count fractionally (each tied sample by its share of the
  remaining votes), so the result does not depend on the samples' order.

  Args:
    x: `(m, d)` gate vectors (0/1, or any reals).
    labels: `(m,)` int labels.
    k: neighbours per sample (reduced to m - 1 when larger).
    chunk: rows of the distance matrix held at once.

  Returns:
    (agreement, chance): the mean fraction of the k neighbours with the
    sample's label, and its expectation for neighbours drawn at random
    without the sample itself, sum_c n_c (n_c - 1) / (m (m - 1)) (about the
    sum of squared class frequencies).
  """
  x = np.asarray(x, np.float32)
  labels = np.asarray(labels)
  m = len(x)
  assert m >= 2 and len(labels) == m, (m, len(labels))
  k = min(k, m - 1)
  sq = np.sum(x * x, axis=1)
  agree = np.empty(m, np.float64)
  for start in range(0, m, chunk):
    stop = min(start + chunk, m)
    d = sq[start:stop, None] + sq[None, :] - 2.0 * (x[start:stop] @ x.T)
    d = np.maximum(d, 0.0)
    d[np.arange(stop - start), np.arange(start, stop)] = np.inf
    kth = np.partition(d, k - 1, axis=1)[:, k - 1 : k]
    same = labels[start:stop, None] == labels[None, :]
    closer, tied = d < kth, d == kth
    need = k - closer.sum(axis=1)
    tied_same = (tied & same).sum(axis=1) / tied.sum(axis=1)
    agree[start:stop] = ((closer & same).sum(axis=1) + need * tied_same) / k
  _, class_counts = np.unique(labels, return_counts=True)
  chance = float(np.sum(class_counts * (class_counts - 1.0)) / (m * (m - 1.0)))
  return float(agree.mean()), chance


def informative_columns(x: np.ndarray) -> np.ndarray:
  """The columns of `x` that are not constant (the others add nothing to
  any distance)."""
  return x[:, np.any(x != x[:1], axis=0)]


def embed_2d(
    x: np.ndarray, pca_dims: int, perplexity: float, seed: int
) -> Tuple[Optional[np.ndarray], int]:
  """PCA to at most `pca_dims` dimensions, then t-SNE to 2 (GaterNet Fig. 5).

  Args:
    x: `(m, d)` gate vectors; constant columns should be dropped first.
    pca_dims: the PCA's output size (skipped when d is not larger).
    perplexity: t-SNE's, lowered for small m.
    seed: of the PCA's and t-SNE's randomness.

  Returns:
    (`(m, 2)` points or None when m < 4 or d == 0, the dimensions t-SNE saw).
  """
  from sklearn import decomposition  # pylint: disable=g-import-not-at-top
  from sklearn import manifold  # pylint: disable=g-import-not-at-top

  m, d = x.shape
  if m < 4 or d == 0:
    return None, d
  x = np.asarray(x, np.float32)
  dims = min(pca_dims, m)
  if d > dims:
    x = decomposition.PCA(n_components=dims, random_state=seed).fit_transform(x)
  tsne = manifold.TSNE(
      n_components=2,
      perplexity=min(perplexity, (m - 1) / 3.0),
      init='pca',
      learning_rate='auto',
      random_state=seed,
  )
  return tsne.fit_transform(x).astype(np.float32), int(x.shape[1])


def correlations(a: np.ndarray, b: np.ndarray) -> Dict[str, Optional[float]]:
  """Pearson and Spearman correlation of `a` and `b`; None where one of them
  is constant (undefined)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  def pearson(u, v):
    u = u - u.mean()
    v = v - v.mean()
    den = np.sqrt(np.sum(u * u) * np.sum(v * v))
    return float(np.sum(u * v) / den) if den > 0 else None

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return {
      'pearson': pearson(a, b),
      'spearman': pearson(stats.rankdata(a), stats.rankdata(b)),
  }


def equal_count_bins(
    key: np.ndarray, values: Mapping[str, np.ndarray], num_bins: int, name: str
) -> List[Dict[str, float]]:
  """Sorts the samples by `key` and cuts them into `num_bins` bins of
  (nearly) equal counts; ties cannot leave a bin empty, as quantile edges
  can.

  Returns:
    Per bin: 'count', `name`_min/_median/_max of the key, and the mean
    (and std) of each array in `values` as '<value>_mean' ('<value>_std').
  """
  key = np.asarray(key, np.float64)
  order = np.argsort(key, kind='stable')
  out = []
  for idx in np.array_split(order, min(num_bins, len(key))):
    row = {
        'count': int(len(idx)),
        f'{name}_min': float(key[idx].min()),
        f'{name}_median': float(np.median(key[idx])),
        f'{name}_max': float(key[idx].max()),
    }
    for v, arr in values.items():
      sel = np.asarray(arr, np.float64)[idx]
      row[f'{v}_mean'] = float(sel.mean())
      row[f'{v}_std'] = float(sel.std())
    out.append(row)
  return out


def class_means(class_sums: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
  """`(classes, total)` fraction of each class' samples with each gate on;
  NaN rows for classes without samples."""
  counts = np.asarray(class_counts, np.float64)[:, None]
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(
        counts > 0, class_sums / np.maximum(counts, 1), np.nan
    ).astype(np.float32)


class GateCollector:
  """Accumulates per-sample results batch by batch.

  Keeps each sample's gate vector as bits (`bits`, `(n, ceil(total / 8))`
  uint8), each gate's on-count, each class' per-gate on-counts (int32) and
  the per-sample label, loss, confidence, correctness, gates on and MACs.
  """

  def __init__(self, total: int, num_classes: int, capacity: int = 1024):
    self.total = int(total)
    self.num_classes = int(num_classes)
    self._bits = np.zeros((max(capacity, 1), (self.total + 7) // 8), np.uint8)
    self.on_counts = np.zeros(self.total, np.int64)
    self.class_sums = np.zeros((self.num_classes, self.total), np.int32)
    self.class_counts = np.zeros(self.num_classes, np.int64)
    self._columns: Dict[str, List[np.ndarray]] = {}
    self.num_samples = 0
    # Segmentation: the split's summed `(classes, classes)` pixel counts.
    self.confusion: Optional[np.ndarray] = None

  @property
  def nbytes(self) -> int:
    """Host memory held by the bit matrix and the sums."""
    return int(
        self._bits.nbytes
        + self.on_counts.nbytes
        + self.class_sums.nbytes
        + self.class_counts.nbytes
    )

  @property
  def bits(self) -> np.ndarray:
    """`(num_samples, ceil(total / 8))` packed gate vectors."""
    return self._bits[: self.num_samples]

  def column(self, name: str) -> np.ndarray:
    """A per-sample array added under `name`, `(num_samples,)`."""
    parts = self._columns.get(name, [])
    return np.concatenate(parts) if parts else np.zeros((0,))

  def add(
      self,
      labels: np.ndarray,
      gates: Optional[np.ndarray] = None,
      **columns: np.ndarray,
  ):
    """Adds a batch.

    Args:
      labels: `(b,)` int labels.
      gates: `(b, total)` 0/1 gate vectors (None for a baseline).
      **columns: `(b,)` per-sample values (loss, confidence, macs...).
    """
    labels = np.asarray(labels, np.int64)
    b = len(labels)
    if gates is not None and self.total:
      g = is_on(np.asarray(gates))
      assert g.shape == (b, self.total), (g.shape, self.total)
      stop = self.num_samples + b
      if stop > len(self._bits):
        grown = np.zeros(
            (max(stop, 2 * len(self._bits)), self._bits.shape[1]), np.uint8
        )
        grown[: self.num_samples] = self.bits
        self._bits = grown
      self._bits[self.num_samples : stop] = np.packbits(g, axis=-1)
      self.on_counts += g.sum(axis=0)
      order = np.argsort(labels, kind='stable')
      classes, starts = np.unique(labels[order], return_index=True)
      self.class_sums[classes] += np.add.reduceat(
          g[order], starts, axis=0, dtype=np.int32
      )
      columns['gates_on'] = g.sum(axis=1)
    np.add.at(self.class_counts, labels, 1)
    columns['label'] = labels
    for name, value in columns.items():
      value = np.asarray(value)
      assert value.shape == (b,), (name, value.shape)
      self._columns.setdefault(name, []).append(value)
    self.num_samples += b


# ---------------------------------------------------------------------------
# Streaming a split through a trained model.


def analysis_step(
    state: steps_lib.TrainState,
    batch: Mapping[str, jax.Array],
    *,
    spec: GateSpec,
    mean,
    std,
    mac_counter: Optional[macs_lib.MacCounter],
    task: Optional[segmentation.Segmentation] = None,
) -> Dict[str, jax.Array]:
  """Per-sample loss, confidence, correctness, binary gates `(b, total)` and
  the MACs the closed gates save (`steps.example_metrics`, as eval), for one
  padded eval batch (with its labels and mask, so every process reads the
  global batch's rows).

  Segmentation (`task`): per image as `example_metrics` says (its label is
  its most frequent class besides class 0, 'correct' its pixel accuracy,
  plus 'iou'), and 'confusion', the batch's `(classes, classes)` pixel
  counts."""
  logits, out = steps_lib.predict(state, batch['image'], mean, std)
  m = steps_lib.example_metrics(
      logits, out, batch['label'], spec, mac_counter, task
  )
  m.pop('gate_l1', None)
  labels = m.pop('label', batch['label'])
  if task is not None:
    m['confusion'] = segmentation.total_confusion(m['confusion'], batch['mask'])
  return dict(m, label=labels, mask=batch['mask'] > 0)


def collect(
    step_fn,
    state,
    batches: Iterable[Mapping[str, np.ndarray]],
    data_sharding,
    collector: GateCollector,
    mac_counter: Optional[macs_lib.MacCounter],
) -> GateCollector:
  """Runs `step_fn` (a jitted `analysis_step`) over padded eval batches and
  adds the unpadded rows to `collector`. The next batch is dispatched before
  the host reads the previous one, so device and host work overlap."""
  t0 = time.time()

  def add(out):
    out = jax.device_get(out)
    if 'confusion' in out:
      confusion = np.asarray(out.pop('confusion'), np.int64)
      collector.confusion = (
          confusion
          if collector.confusion is None
          else collector.confusion + confusion
      )
    keep = np.asarray(out.pop('mask'))
    labels = np.asarray(out.pop('label'))[keep]
    gates = out.pop('gates', None)
    cols = {k: np.asarray(v)[keep] for k, v in out.items()}
    if 'macs_saved' in cols:
      # float64 on the host: exact for any network size.
      saved = cols.pop('macs_saved').astype(np.float64)
      cols['macs'] = mac_counter.dense_total - saved
    collector.add(
        labels, None if gates is None else np.asarray(gates)[keep], **cols
    )

  pending = None
  for i, batch in enumerate(batches):
    nxt = step_fn(state, sharding.to_global(batch, data_sharding))
    if pending is not None:
      add(pending)
    pending = nxt
    if i % 20 == 19:
      logging.info(
          'Analysed %d samples (%.0f/s).',
          collector.num_samples,
          collector.num_samples / max(time.time() - t0, 1e-9),
      )
  if pending is not None:
    add(pending)
  return collector


# ---------------------------------------------------------------------------
# The mode: restore, stream, compute, draw, write.


def _check_analysis_config(cfg: ml_collections.ConfigDict):
  """Raises a ConfigError for an `analysis` field out of range."""
  if cfg.split not in ('test', 'train'):
    raise ConfigError(
        f"analysis.split must be 'test' or 'train'; got " f'{cfg.split!r}.'
    )
  if not 0.0 <= cfg.frequent_low < cfg.frequent_high <= 1.0:
    raise ConfigError(
        f'analysis.frequent_low and frequent_high must satisfy '
        f'0 <= low < high <= 1; got {cfg.frequent_low}, '
        f'{cfg.frequent_high}.'
    )
  for key in ('knn_k', 'pca_dims', 'histogram_bins', 'difficulty_bins', 'dpi'):
    if cfg[key] < 1:
      raise ConfigError(f'analysis.{key} must be >= 1; got {cfg[key]}.')
  if cfg.tsne_samples < 0 or cfg.batch_size < 0:
    raise ConfigError(
        'analysis.tsne_samples and analysis.batch_size must be ' '>= 0.'
    )


def split_batches(ds, split: str, batch_size: int):
  """(padded batches, split name, number of examples) of `split`."""
  if split == 'test':
    return (
        ds.eval_batches(batch_size),
        ds.test_split_name,
        ds.num_test_examples,
    )
  arrays = ds.train_arrays()
  if arrays is None:
    raise ConfigError(
        "analysis.split='train' needs an in-memory dataset "
        '(digits, CIFAR); this one is streamed.'
    )
  return (
      batching.eval_batches(arrays['image'], arrays['label'], batch_size),
      'train',
      ds.num_train_examples,
  )


def _clear_outputs(out_dir: str):
  """Removes what an earlier analysis wrote here (and nothing else)."""
  out = paths_lib.resolve(out_dir)
  names = [JSON_NAME] + list(_ALL_FIGURES.values())
  for p in [out / n for n in names] + list(out.glob('events.out.tfevents.*')):
    if p.exists() and not p.is_dir():
      p.unlink()


def _finite(obj: Any) -> Any:
  """`obj` with NaN and infinite floats (a diverged model's losses) as
  None, so the file stays strict JSON."""
  if isinstance(obj, float):
    return obj if np.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def _write_json(path: str, obj: Any):
  paths_lib.write_text(
      path, json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False)
  )


_GATING_NAMES = {
    'gater': 'GaterNet',
    'local': 'batch-shaping (local gates)',
    'none': 'baseline',
}


def gate_statistics(
    collector: GateCollector,
    spec: GateSpec,
    cfg: ml_collections.ConfigDict,
    mac_counter: Optional[macs_lib.MacCounter],
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Every number of the analysis from a filled collector.

  Returns:
    (the JSON's gate sections, arrays the figures need).
  """
  n, total = collector.num_samples, spec.total
  on_counts = collector.on_counts
  rows = gate_type_rows(on_counts, n, spec)
  totals = gate_type_counts(on_counts, n, spec)['total']
  dep = input_dependent_on_counts(on_counts, n)
  frequent = frequent_gates(on_counts, n, cfg.frequent_low, cfg.frequent_high)
  out: Dict[str, Any] = {
      'gate_types': dict(
          totals, **{f'{k}_fraction': totals[k] / total for k in KINDS}
      ),
      'gate_types_per_site': rows,
      'gate_types_per_group': group_rows(rows),
      'on_count_histogram': on_count_histogram(
          on_counts, n, cfg.histogram_bins
      ),
      'frequent_gates': {
          'low': cfg.frequent_low,
          'high': cfg.frequent_high,
          'count': frequent,
          'fraction_of_input_dependent': frequent / max(len(dep), 1),
      },
  }
  gates_on = collector.column('gates_on')
  out['gates_on_per_sample'] = dict(
      describe(gates_on), fraction_mean=float(gates_on.mean() / total)
  )
  arrays: Dict[str, Any] = {'on_counts_dependent': dep, 'gates_on': gates_on}

  # Difficulty vs cost: conditional MACs where counted, else gates on.
  cost = (
      collector.column('macs')
      if mac_counter is not None
      else gates_on.astype(np.float64)
  )
  cost_name = 'macs' if mac_counter is not None else 'gates_on'
  loss, conf = collector.column('loss'), collector.column('confidence')
  correct = collector.column('correct').astype(np.float64)
  values = {'cost': cost, 'loss': loss, 'confidence': conf, 'accuracy': correct}
  seg = collector.confusion is not None
  if seg:
    # Segmentation: 'accuracy' is each image's pixel accuracy.
    values['iou'] = collector.column('iou').astype(np.float64)
  out['difficulty'] = {
      'cost': cost_name,
      'cost_vs_loss': correlations(cost, loss),
      'cost_vs_confidence': correlations(cost, conf),
      'loss_bins': equal_count_bins(loss, values, cfg.difficulty_bins, 'loss'),
      'confidence_bins': equal_count_bins(
          conf, values, cfg.difficulty_bins, 'confidence'
      ),
  }
  if seg:
    out['difficulty']['cost_vs_iou'] = correlations(cost, values['iou'])
    arrays['iou'] = values['iou']
    arrays['cost'] = cost
  else:
    out['difficulty'].update(
        cost_correct_mean=float(cost[correct > 0].mean())
        if np.any(correct > 0)
        else None,
        cost_wrong_mean=float(cost[correct == 0].mean())
        if np.any(correct == 0)
        else None,
    )

  # Per class.
  means = class_means(collector.class_sums, collector.class_counts)
  labels = collector.column('label')
  per_class = []
  for c in np.flatnonzero(collector.class_counts):
    sel = labels == c
    per_class.append(
        {
            'label': int(c),
            'count': int(sel.sum()),
            'accuracy': float(correct[sel].mean()),
            'gates_on_mean': float(gates_on[sel].mean()),
            'cost_mean': float(cost[sel].mean()),
        }
    )
  out['per_class'] = per_class
  arrays['class_means'] = means

  # Embedding and k-NN agreement on a random subsample.
  m = min(cfg.tsne_samples, n)
  if m >= 2:
    rows_ = np.random.default_rng(cfg.seed).permutation(n)[:m]
    x = informative_columns(unpack_gates(collector.bits[rows_], total))
    sub_labels = labels[rows_]
    agreement, chance = knn_label_agreement(x, sub_labels, cfg.knn_k)
    t = time.time()
    xy, dims = embed_2d(x, cfg.pca_dims, cfg.tsne_perplexity, cfg.seed)
    out['embedding'] = {
        'samples': int(m),
        'seed': cfg.seed,
        'informative_gates': int(x.shape[1]),
        'tsne_input_dims': dims,
        'knn_k': int(min(cfg.knn_k, m - 1)),
        'knn_agreement': agreement,
        'knn_chance': chance,
        'knn_lift': agreement / chance if chance > 0 else None,
        'tsne_seconds': time.time() - t,
    }
    arrays.update(xy=xy, xy_labels=sub_labels)
  return out, arrays


def _draw(
    out_dir: str,
    result: Mapping[str, Any],
    arrays: Mapping[str, Any],
    spec: GateSpec,
    num_classes: int,
    dpi: int,
    tag: str,
) -> Dict[str, str]:
  """Writes the figures; returns {figure key: path}."""
  from gaternet_jax import plots  # pylint: disable=g-import-not-at-top

  paths = {}

  def save(key, fig):
    paths[key] = plots.save(
        fig, paths_lib.join(out_dir, _ALL_FIGURES[key]), dpi
    )

  rows = result['gate_types_per_site']
  counts = {k: np.array([r[k] for r in rows]) for k in KINDS}
  names = [r['site'] for r in rows]
  save(
      'gate_types_fraction',
      plots.gate_types(
          names, counts, True, f'Share of gate types per gated layer\n{tag}'
      ),
  )
  save(
      'gate_types_count',
      plots.gate_types(
          names,
          counts,
          False,
          f'Number of gates of each type per gated layer\n' f'{tag}',
      ),
  )
  n = result['num_examples']
  freq = result['frequent_gates']
  save(
      'on_count_histogram',
      plots.on_count_histogram(
          arrays['on_counts_dependent'],
          n,
          len(result['on_count_histogram']['counts']),
          freq['low'],
          freq['high'],
          f'{len(arrays["on_counts_dependent"])} input-dependent gates, '
          f'{freq["count"]} frequent\n{tag}',
      ),
  )
  macs = arrays.get('macs')
  save(
      'per_sample_cost',
      plots.per_sample_cost(
          arrays['gates_on'],
          spec.total,
          macs,
          result['macs']['macs_dense'] if macs is not None else None,
          tag,
      ),
  )
  diff = result['difficulty']
  rho = diff['cost_vs_loss']['spearman']
  save(
      'cost_vs_difficulty',
      plots.cost_vs_difficulty(
          diff['loss_bins'],
          diff['confidence_bins'],
          diff['cost'] == 'macs',
          f'Cost vs difficulty (Spearman cost-loss ' f'{_fmt(rho)})\n{tag}',
      ),
  )
  save(
      'class_mean_gates',
      plots.class_mean_gates(
          arrays['class_means'],
          spec.sizes,
          [(g['group'], g['gates']) for g in result['gate_types_per_group']],
          f'Mean gate vector per class\n{tag}',
      ),
  )
  if 'iou' in arrays:
    rho = diff['cost_vs_iou']['spearman']
    save(
        'cost_vs_iou',
        plots.cost_vs_iou(
            arrays['cost'],
            arrays['iou'],
            diff['cost'] == 'macs',
            result['macs']['macs_dense'] if 'macs' in result else None,
            f'Per-image cost vs IoU (Spearman {_fmt(rho)})\n{tag}',
        ),
    )
  if 'embedding' in result:
    e = result['embedding']
    note = (
        f'{e["knn_k"]}-NN label agreement {e["knn_agreement"]:.3f} '
        f'(chance {e["knn_chance"]:.3f})'
    )
    if arrays['xy'] is None:
      note = 'every sampled gate vector is the same: nothing to embed'
    save(
        'tsne',
        plots.embedding(
            arrays['xy'],
            arrays['xy_labels'],
            num_classes,
            f'Gate vectors of {e["samples"]} samples, PCA + t-SNE\n{tag}',
            note,
        ),
    )
  return paths


def _fmt(x: Optional[float]) -> str:
  return 'undefined' if x is None else f'{x:+.3f}'


def _write_tensorboard(
    out_dir: str,
    step: int,
    paths: Mapping[str, str],
    scalars: Mapping[str, float],
):
  """The figures as TensorBoard images (and the headline numbers), in
  `out_dir`; skipped when TensorFlow or TensorBoard is missing."""
  if not metrics_lib.tensorboard_available():
    return
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  writer = metric_writers.create_default_writer(out_dir, asynchronous=False)
  images = {}
  for key, path in paths.items():
    with paths_lib.resolve(path).open('rb') as f, Image.open(f) as im:
      images[f'analysis/{key}'] = np.asarray(im.convert('RGB'))[None]
  writer.write_images(step, images)
  writer.write_scalars(
      step,
      {
          f'analysis/{k}': v
          for k, v in scalars.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)
      },
  )
  writer.close()


def run_analysis(
    config: ml_collections.ConfigDict, workdir: str
) -> Dict[str, Any]:
  """Analyses the gates of `workdir`'s latest intact checkpoint.

  Args:
    config: the run's config; `config.analysis` says what to analyse.
    workdir: a trained workdir (or, with `config.init.official_checkpoint`,
      any directory).

  Returns:
    The contents of `<workdir>/analysis/analysis.json`, with 'figures' (the
    PNGs' paths) and 'out_dir'.

  Raises:
    WorkdirError: no workdir, or no intact checkpoint in it.
    ConfigError: an `analysis` field out of range.
  """
  if not workdir:
    raise WorkdirError('--mode=analyze needs the --workdir of a trained run.')
  workdir = str(paths_lib.resolve(workdir))
  cfg = config.analysis
  _check_analysis_config(cfg)
  source = evaluation.eval_weights(config, workdir, purpose='analyze')
  exp = experiment.setup(config)
  ds, model, spec, mesh = exp.ds, exp.model, exp.spec, exp.mesh
  batch_size = cfg.batch_size or config.eval_batch_size
  sharding.check_batch_size(batch_size, 'analysis.batch_size')
  batches, split, num_examples = split_batches(ds, cfg.split, batch_size)
  state = evaluation.restore_for_eval(
      config, workdir, model, exp.image_shape, mesh, source
  )
  step = int(state.step)
  mac_counter = exp.mac_counter
  step_fn = jax.jit(
      functools.partial(
          analysis_step,
          spec=spec,
          mean=tuple(ds.mean),
          std=tuple(ds.std),
          mac_counter=mac_counter,
          task=exp.task,
      ),
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
      out_shardings=sharding.replicated(mesh),
  )
  t0 = time.time()
  collector = collect(
      step_fn,
      state,
      batches,
      sharding.batch_sharded(mesh),
      GateCollector(spec.total, ds.num_classes, capacity=num_examples),
      mac_counter,
  )
  seconds = time.time() - t0
  n = collector.num_samples
  gating = model.gating
  correct = collector.column('correct').astype(np.float64)
  result: Dict[str, Any] = {
      'workdir': workdir,
      'step': step,
      'split': split,
      'num_examples': n,
      'dataset': ds.name,
      'num_classes': ds.num_classes,
      'gating': gating,
      'gated_filters': spec.total,
      'gated_sites': len(spec),
      'accuracy': float(correct.mean()),
      'loss': float(collector.column('loss').mean()),
      'eval_seconds': seconds,
  }
  if collector.confusion is not None:
    # Segmentation: the split's scores from its summed pixel counts;
    # 'accuracy' above is the images' mean pixel accuracy.
    scores = segmentation.scores(collector.confusion)
    result.update(
        miou=scores['miou'],
        pixel_accuracy=scores['pixel_accuracy'],
        class_iou=scores['class_iou'],
        image_iou_mean=float(collector.column('iou').mean()),
    )
  if mac_counter is not None:
    result['macs'] = evaluation.summarize_macs(
        collector.column('macs'), mac_counter
    )
  arrays: Dict[str, Any] = {}
  if spec:
    sections, arrays = gate_statistics(collector, spec, cfg, mac_counter)
    result.update(sections)
    if mac_counter is not None:
      arrays['macs'] = collector.column('macs')
  else:
    result['note'] = (
        'This model has no gates (a baseline): there are no '
        'gate statistics or figures, only its accuracy and '
        'dense MACs.'
    )
  result['seconds'] = time.time() - t0

  out_dir = paths_lib.join(workdir, OUT_DIR)
  paths: Dict[str, str] = {}
  if jax.process_index() == 0:
    paths_lib.resolve(out_dir).mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    if spec:
      tag = (
          f'{_GATING_NAMES[gating]}, {ds.name} {split} ({n} samples), '
          f'step {step}'
      )
      paths = _draw(out_dir, result, arrays, spec, ds.num_classes, cfg.dpi, tag)
    result['figures'] = sorted(
        paths_lib.resolve(p).name for p in paths.values()
    )
    _write_json(paths_lib.join(out_dir, JSON_NAME), result)
    if config.tensorboard:
      _write_tensorboard(out_dir, step, paths, headline(result))
  result['out_dir'] = out_dir
  return result


def headline(result: Mapping[str, Any]) -> Dict[str, Any]:
  """The analysis' main numbers, flat (the mode's last JSON line)."""
  h = {
      k: result[k]
      for k in (
          'split',
          'num_examples',
          'accuracy',
          'loss',
          'gating',
          'gated_filters',
          'step',
      )
  }
  if 'macs' in result:
    h['macs_dense'] = result['macs']['macs_dense']
    h['macs_mean'] = result['macs']['macs_mean']
    h['macs_reduction'] = result['macs']['macs_reduction']
  if 'gate_types' in result:
    for k in KINDS:
      h[f'{k}_fraction'] = result['gate_types'][f'{k}_fraction']
    groups = result['gate_types_per_group']
    h['first_group'], h['last_group'] = groups[0]['group'], groups[-1]['group']
    h['always_off_fraction_first_group'] = groups[0]['always_off_fraction']
    h['always_off_fraction_last_group'] = groups[-1]['always_off_fraction']
    h['input_dependent_fraction_first_group'] = groups[0][
        'input_dependent_fraction'
    ]
    h['input_dependent_fraction_last_group'] = groups[-1][
        'input_dependent_fraction'
    ]
    h['frequent_gates'] = result['frequent_gates']['count']
    g = result['gates_on_per_sample']
    h.update(
        gates_on_min=g['min'], gates_on_mean=g['mean'], gates_on_max=g['max']
    )
    d = result['difficulty']
    h['cost'] = d['cost']
    h['cost_loss_pearson'] = d['cost_vs_loss']['pearson']
    h['cost_loss_spearman'] = d['cost_vs_loss']['spearman']
    h['cost_confidence_spearman'] = d['cost_vs_confidence']['spearman']
  if 'embedding' in result:
    h['knn_agreement'] = result['embedding']['knn_agreement']
    h['knn_chance'] = result['embedding']['knn_chance']
  for k in ('miou', 'pixel_accuracy', 'image_iou_mean'):
    if k in result:
      h[k] = result[k]
  if 'cost_vs_iou' in result.get('difficulty', {}):
    h['cost_iou_spearman'] = result['difficulty']['cost_vs_iou']['spearman']
  h['out_dir'] = result.get('out_dir', '')
  return _finite(h)


def format_report(result: Mapping[str, Any]) -> str:
  """A few readable lines about the analysis."""
  score = (
      f'mIoU {result["miou"]:.2%}, pixel accuracy '
      f'{result["pixel_accuracy"]:.2%}'
      if 'miou' in result
      else f'accuracy {result["accuracy"]:.2%}'
  )
  lines = [
      f'{_GATING_NAMES[result["gating"]]} at step {result["step"]}: '
      f'{result["num_examples"]} {result["split"]} samples, {score}, loss '
      f'{result["loss"]:.4f}'
  ]
  if 'macs' in result:
    m = result['macs']
    lines.append(
        f'MACs/image {macs_lib.format_macs(m["macs_mean"])} '
        f'(dense backbone {macs_lib.format_macs(m["macs_dense"])}, '
        f'{0.0 - m["macs_reduction"]:+.1%})'
    )
  if 'note' in result:
    lines.append(result['note'])
  if 'gate_types' in result:
    t = result['gate_types']
    lines.append(
        f'{result["gated_filters"]} gates: {t["always_on"]} always on, '
        f'{t["always_off"]} always off, {t["input_dependent"]} '
        f'input-dependent ({result["frequent_gates"]["count"]} frequent)'
    )
    for g in result['gate_types_per_group']:
      lines.append(
          f'  {g["group"]:<12} {g["gates"]:>6} gates: '
          f'{g["always_off_fraction"]:6.1%} always off, '
          f'{g["always_on_fraction"]:6.1%} always on, '
          f'{g["input_dependent_fraction"]:6.1%} input-dependent'
      )
    g = result['gates_on_per_sample']
    lines.append(
        f'gates on per sample: min {g["min"]:.0f}, mean '
        f'{g["mean"]:.1f}, max {g["max"]:.0f}'
    )
    if 'embedding' in result:
      e = result['embedding']
      lines.append(
          f'{e["knn_k"]}-NN label agreement of gate vectors '
          f'{e["knn_agreement"]:.3f} (chance {e["knn_chance"]:.3f})'
      )
    d = result['difficulty']
    lines.append(
        f'{d["cost"]} vs loss: Pearson '
        f'{_fmt(d["cost_vs_loss"]["pearson"])}, Spearman '
        f'{_fmt(d["cost_vs_loss"]["spearman"])}'
    )
    if 'cost_vs_iou' in d:
      lines.append(
          f'{d["cost"]} vs per-image IoU: Pearson '
          f'{_fmt(d["cost_vs_iou"]["pearson"])}, Spearman '
          f'{_fmt(d["cost_vs_iou"]["spearman"])}'
      )
  if result.get('out_dir'):
    lines.append(
        f'wrote {paths_lib.join(result["out_dir"], JSON_NAME)} and '
        f'{len(result.get("figures", []))} figures'
    )
  return '\n'.join(lines)
