"""The figures of the gate analysis (gaternet_jax.analysis), in matplotlib.

Every function takes plain numpy arrays and returns a `Figure` of a fixed
size (`FIGSIZE` inches; `save` writes it at a given DPI without cropping, so
a figure's pixel size is `FIGSIZE * dpi`). Colours come from the Okabe-Ito
palette, which stays distinguishable under the common colour-vision
deficiencies; heat maps use viridis.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # Files only: no display, no GUI toolkit.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from gaternet_jax import paths  # pylint: disable=g-import-not-at-top

# Width and height in inches of every figure.
FIGSIZE = (8.0, 4.5)

# Okabe & Ito (2008), "Color universal design".
OKABE_ITO = (
    '#E69F00',
    '#56B4E9',
    '#009E73',
    '#F0E442',
    '#0072B2',
    '#D55E00',
    '#CC79A7',
    '#000000',
)
GREY = '#999999'
# Up to ten classes get a colour and a marker each; more share a colour map.
CLASS_COLORS = OKABE_ITO + (GREY, '#004D40')
CLASS_MARKERS = ('o', 's', '^', 'D', 'v', 'P', 'X', '*', '<', '>')
KIND_COLORS = {
    'always_on': OKABE_ITO[4],
    'input_dependent': OKABE_ITO[0],
    'always_off': GREY,
}
KIND_LABELS = {
    'always_on': 'always on',
    'input_dependent': 'input-dependent',
    'always_off': 'always off',
}
KINDS = ('always_off', 'always_on', 'input_dependent')


def _figure(ncols: int = 1):
  fig, axes = plt.subplots(
      1, ncols, figsize=FIGSIZE, layout='constrained', squeeze=False
  )
  return fig, axes[0]


def save(fig, path: str, dpi: int) -> str:
  """Writes `fig` as a PNG of `FIGSIZE * dpi` pixels (atomically, local or
  gs://), closes it."""
  try:
    return paths.save_figure(fig, path, dpi)
  finally:
    plt.close(fig)


def _site_ticks(ax, names: Sequence[str], max_labels: int = 24):
  """Site names under the bars, thinned to at most `max_labels`."""
  step = max(1, int(np.ceil(len(names) / max_labels)))
  ticks = np.arange(0, len(names), step)
  ax.set_xticks(ticks)
  ax.set_xticklabels(
      [names[i] for i in ticks], rotation=60, ha='right', fontsize=7
  )


def gate_types(
    names: Sequence[str],
    counts: Mapping[str, np.ndarray],
    fraction: bool,
    title: str,
):
  """Stacked bars of always-off / always-on / input-dependent gates per site.

  Args:
    names: the gated sites in depth order.
    counts: `{kind: (sites,) counts}` for the three kinds.
    fraction: plot each site's share of its gates (GaterNet Figure 2)
      instead of the counts (Figure 6).
    title: the figure's title.
  """
  fig, (ax,) = _figure()
  x = np.arange(len(names))
  sizes = sum(np.asarray(counts[k], np.float64) for k in KINDS)
  bottom = np.zeros(len(names))
  for kind in KINDS:
    y = np.asarray(counts[kind], np.float64)
    if fraction:
      y = 100.0 * y / np.maximum(sizes, 1)
    ax.bar(
        x,
        y,
        bottom=bottom,
        width=0.85,
        color=KIND_COLORS[kind],
        label=KIND_LABELS[kind],
        edgecolor='none',
    )
    bottom += y
  ax.set_xlim(-0.6, len(names) - 0.4)
  ax.set_ylabel('gates (%)' if fraction else 'gates')
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if fraction:
    ax.set_ylim(0, 100)
  ax.set_xlabel('gated layer (depth order)')
  _site_ticks(ax, names)
  ax.set_title(title)
  ax.legend(
      loc='upper left', bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8
  )
  return fig


def on_count_histogram(
    on_counts: np.ndarray,
    num_samples: int,
    bins: int,
    low: float,
    high: float,
    title: str,
):
  """How many samples switch each input-dependent gate on (GaterNet Fig. 3).

  Args:
    on_counts: `(k,)` on-counts of the input-dependent gates, in
      [1, num_samples - 1].
    num_samples: the samples the counts are over.
    bins: number of equal-width bins over [1, num_samples - 1].
    low, high: the 'frequent' band as fractions of the samples (shaded).
    title: the figure's title.
  """
  fig, (ax,) = _figure()
  for i, edge in enumerate((low, high)):
    ax.axvline(
        edge * num_samples,
        color=OKABE_ITO[5],
        linestyle='--',
        linewidth=1,
        label=None if i else f'frequent: {low:.0%} to {high:.0%} of samples',
    )
  if len(on_counts):
    ax.hist(
        on_counts,
        bins=bins,
        range=(1, max(num_samples - 1, 2)),
        color=OKABE_ITO[0],
        edgecolor='white',
        linewidth=0.3,
        label='input-dependent gates',
    )
  else:
    ax.text(
        0.5,
        0.5,
        'no input-dependent gates',
        transform=ax.transAxes,
        ha='center',
        va='center',
    )
  ax.set_xlim(0, num_samples)
  ax.set_xlabel(f'samples (of {num_samples}) for which the gate is on')
  ax.set_ylabel('input-dependent gates')
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_title(title)
  ax.legend(frameon=False, fontsize=8)
  return fig


def per_sample_cost(
    gates_on: np.ndarray,
    total: int,
    macs: Optional[np.ndarray],
    macs_dense: Optional[float],
    title: str,
):
  """Histograms of gates on per sample (GaterNet Fig. 4) and, when counted,
  of conditional MACs per sample (dense cost marked)."""
  fig, axes = _figure(2 if macs is not None else 1)
  ax = axes[0]
  lo, hi = int(gates_on.min()), int(gates_on.max())
  bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 60 else 60
  ax.hist(
      gates_on, bins=bins, color=OKABE_ITO[4], edgecolor='white', linewidth=0.3
  )
  ax.set_xlabel(f'gates on (of {total})')
  ax.set_ylabel('samples')
  ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set_title(
      f'gates on per sample: min {lo}, mean '
      f'{gates_on.mean():.1f}, max {hi}',
      fontsize=9,
  )
  if macs is not None:
    ax = axes[1]
    macs = np.asarray(macs, np.float64)
    scale, unit = _macs_unit(max(float(macs.max()), float(macs_dense or 0)))
    lo, hi = float(macs.min()), float(macs.max())
    ax.hist(macs / scale, bins=40, color=OKABE_ITO[2], edgecolor='none')
    label = 'MACs per sample (gater or gating modules included)'
    span = max(hi - lo, 1e-9 * max(hi, 1.0))
    if macs_dense and lo - span <= macs_dense <= hi + span:
      ax.axvline(
          macs_dense / scale,
          color=OKABE_ITO[5],
          linestyle='--',
          label='dense backbone',
      )
      ax.legend(frameon=False, fontsize=8)
    elif macs_dense:  # Far off the histogram: name it instead.
      label += f'\ndense backbone: {macs_dense / scale:.4g} {unit}'
    ax.set_xlabel(f'conditional MACs per sample ({unit})')
    ax.set_ylabel('samples')
    ax.set_title(label, fontsize=9)
  fig.suptitle(title)
  return fig


def _macs_unit(n: float):
  for unit, scale in (('GMACs', 1e9), ('MMACs', 1e6), ('KMACs', 1e3)):
    if n >= scale:
      return scale, unit
  return 1.0, 'MACs'


def embedding(
    xy: Optional[np.ndarray],
    labels: np.ndarray,
    num_classes: int,
    title: str,
    note: str = '',
):
  """The 2-D t-SNE embedding of gate vectors, coloured by label (Fig. 5).

  Args:
    xy: `(m, 2)` embedded points, or None when there was nothing to embed
      (`note` then says why).
    labels: `(m,)` int labels.
    num_classes: number of classes (sets the colours).
    title: the figure's title.
    note: a line printed in the corner (e.g. the k-NN agreement).
  """
  fig, (ax,) = _figure()
  if xy is None:
    ax.text(
        0.5,
        0.5,
        note,
        transform=ax.transAxes,
        ha='center',
        va='center',
        wrap=True,
    )
    ax.set_axis_off()
  else:
    if num_classes <= len(CLASS_COLORS):
      for c in range(num_classes):
        pts = xy[labels == c]
        if len(pts):
          ax.scatter(
              pts[:, 0],
              pts[:, 1],
              s=7,
              alpha=0.75,
              color=CLASS_COLORS[c],
              marker=CLASS_MARKERS[c],
              linewidths=0,
              label=str(c),
          )
      ax.legend(
          title='label',
          loc='upper left',
          bbox_to_anchor=(1.0, 1.0),
          frameon=False,
          fontsize=8,
          markerscale=2,
      )
    else:
      sc = ax.scatter(
          xy[:, 0],
          xy[:, 1],
          s=5,
          c=labels,
          cmap='viridis',
          vmin=0,
          vmax=num_classes - 1,
          linewidths=0,
      )
      fig.colorbar(sc, ax=ax, label='label')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel('t-SNE 1')
    ax.set_ylabel('t-SNE 2')
    if note:
      ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, va='bottom')
  ax.set_title(title)
  return fig


def cost_vs_difficulty(
    bins: Sequence[Dict[str, float]],
    conf_bins: Sequence[Dict[str, float]],
    macs: bool,
    title: str,
):
  """Mean cost (+- its standard error) per equal-count bin of the samples
  sorted by loss, and by confidence.

  Args:
    bins: per loss bin, lowest loss first: {'count', 'loss_median',
      'cost_mean', 'cost_std'}.
    conf_bins: per confidence bin, least confident first: the same with
      'confidence_median'.
    macs: the cost is conditional MACs (else gates on).
    title: the figure's title.
  """
  fig, axes = _figure(2)
  scale, cost_label = 1.0, 'gates on per sample'
  if macs:
    scale, unit = _macs_unit(max(b['cost_mean'] for b in bins))
    cost_label = f'conditional {unit} per sample'
  loss_fmt = lambda v: f'{v:.2g}'
  conf_fmt = lambda v: f'{v:.3f}' if v < 0.999 else '>.999'
  for ax, rows, key, what, fmt, color, marker in (
      (axes[0], bins, 'loss', 'per-sample loss', loss_fmt, OKABE_ITO[5], 'o'),
      (
          axes[1],
          conf_bins,
          'confidence',
          'top softmax probability',
          conf_fmt,
          OKABE_ITO[4],
          's',
      ),
  ):
    x = np.arange(1, len(rows) + 1)
    mean = np.array([b['cost_mean'] for b in rows]) / scale
    err = np.array([b['cost_std'] / np.sqrt(b['count']) for b in rows]) / scale
    ax.errorbar(x, mean, yerr=err, color=color, marker=marker, capsize=3)
    ax.set_xticks(
        x,
        labels=[fmt(b[f'{key}_median']) for b in rows],
        rotation=45,
        fontsize=7,
    )
    ax.set_xlabel(f'{what} (median of each bin)')
    ax.set_ylabel(cost_label)
    ax.set_title(
        f'cost by {key}: {len(rows)} equal-count bins, mean ' f'\u00b1 s.e.',
        fontsize=9,
    )
  fig.suptitle(title)
  return fig


def cost_vs_iou(
    cost: np.ndarray,
    iou: np.ndarray,
    macs: bool,
    macs_dense: Optional[float],
    title: str,
):
  """Segmentation: each image's conditional cost against its own IoU (its
  mean IoU over the classes it shows or is predicted), one dot per image,
  with the mean IoU of equal-count cost bins as a line.

  Args:
    cost: `(n,)` MACs (or gates on) per image.
    iou: `(n,)` per-image IoU in [0, 1].
    macs: the cost is conditional MACs (else gates on).
    macs_dense: the dense backbone's MACs, marked when near the dots.
    title: the figure's title.
  """
  fig, axes = _figure(1)
  ax = axes[0]
  cost = np.asarray(cost, np.float64)
  scale, label = 1.0, 'gates on per image'
  if macs:
    scale, unit = _macs_unit(float(cost.max()))
    label = f'conditional {unit} per image'
  x = cost / scale
  ax.scatter(x, iou, s=6, alpha=0.5, color=OKABE_ITO[4], edgecolors='none')
  order = np.argsort(x, kind='stable')
  parts = [p for p in np.array_split(order, min(10, len(order))) if len(p)]
  ax.plot(
      [x[p].mean() for p in parts],
      [iou[p].mean() for p in parts],
      color=OKABE_ITO[5],
      marker='o',
      label='mean of 10 equal-count cost bins',
  )
  if macs and macs_dense:
    span = max(x.max() - x.min(), 1e-9)
    if x.min() - span <= macs_dense / scale <= x.max() + span:
      ax.axvline(
          macs_dense / scale,
          color=OKABE_ITO[2],
          linestyle='--',
          label='dense backbone',
      )
  ax.set_xlabel(label)
  ax.set_ylabel('IoU of the image (mean over its classes)')
  ax.set_ylim(-0.02, 1.02)
  ax.legend(frameon=False, fontsize=8)
  fig.suptitle(title)
  return fig


def class_mean_gates(
    means: np.ndarray,
    sizes: Sequence[int],
    groups: Sequence[Tuple[str, int]],
    title: str,
):
  """Heat map of each class' mean gate vector: classes x gates in depth
  order.

  Args:
    means: `(classes, gates)` fraction of each class' samples with each gate
      on (NaN rows for classes without samples).
    sizes: gates per gated layer, in depth order (thin white lines).
    groups: (name, gates) of each stage of layers (thick lines; names on
      top).
    title: the figure's title.
  """
  fig, (ax,) = _figure()
  im = ax.imshow(
      np.ma.masked_invalid(means),
      aspect='auto',
      interpolation='nearest',
      cmap='viridis',
      vmin=0.0,
      vmax=1.0,
  )
  for edge in np.cumsum(sizes)[:-1]:
    ax.axvline(edge - 0.5, color='white', linewidth=0.5)
  edges = np.concatenate([[0], np.cumsum([n for _, n in groups])])
  for edge in edges[1:-1]:
    ax.axvline(edge - 0.5, color='white', linewidth=2.0)
  top = ax.secondary_xaxis('top')
  top.set_xticks(
      (edges[:-1] + edges[1:]) / 2 - 0.5,
      labels=[name for name, _ in groups],
      fontsize=7,
      rotation=30 if len(groups) > 6 else 0,
  )
  ax.set_xlabel('gate, in depth order (thin lines: layers; thick: stages)')
  ax.set_ylabel('class')
  if means.shape[0] <= 20:
    ax.set_yticks(np.arange(means.shape[0]))
  fig.colorbar(
      im, ax=ax, label="fraction of the class' samples with the " 'gate on'
  )
  ax.set_title(title)
  return fig
