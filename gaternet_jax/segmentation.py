"""The semantic segmentation task: per-pixel cross-entropy with an ignore
label, the confusion matrix, mIoU and pixel accuracy.

`enabled(config)` is the one place that decides whether a run segments
(`config.model.segmentation.enabled`); `Segmentation.from_config(config)`
is then the task (None: the run classifies). The steps (steps.py) read
it to pick the loss, the joint augmentation and the metrics; the eval sums
the images' confusion matrices on the devices (`total_confusion`, over the
global batch in the jitted step) and `scores` turns the sum into mIoU.

Conventions: labels are `(batch, h, w)` int32 class ids in [0, classes) or
`ignore_label`; a confusion matrix is `(classes, classes)` int32 with
ground truth on rows and predictions on columns, counting valid pixels
only; a class's IoU is TP / (TP + FP + FN), and mIoU averages the classes
that occur (in the ground truth or the predictions) in what was counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Datasets whose labels are per-pixel masks (data.py loads them).
DATASETS = ('shapes', 'cityscapes')


@dataclasses.dataclass(frozen=True)
class Segmentation:
  """A segmentation run's task: its classes and the ignored label."""

  num_classes: int
  ignore_label: int

  @classmethod
  def from_config(
      cls, config: ml_collections.ConfigDict, num_classes: int
  ) -> Optional['Segmentation']:
    """The task of `config` (None: classification)."""
    if not enabled(config):
      return None
    return cls(int(num_classes), int(config.data.ignore_label))


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` is a segmentation run: the one place that decides
  (`config.model.segmentation.enabled`; configs without the section, such
  as an older run's config.json, classify)."""
  seg = config.model.get('segmentation')
  return bool(seg is not None and seg.enabled)


def _valid(labels: jax.Array, ignore_label: int) -> jax.Array:
  return labels != ignore_label


def pixel_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_label: int,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Mean softmax cross-entropy over the valid pixels of the batch.

  Args:
    logits: `(batch, h, w, classes)`.
    labels: `(batch, h, w)` int, `ignore_label` where not counted.
    ignore_label: the label value the loss skips.
    label_smoothing: as for classification.

  Returns:
    A float32 scalar (0 when no pixel is valid).
  """
  valid = _valid(labels, ignore_label)
  safe = jnp.where(valid, labels, 0)
  logits = logits.astype(jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(
        jax.nn.one_hot(safe, logits.shape[-1]), label_smoothing
    )
    losses = optax.softmax_cross_entropy(logits, targets)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  w = valid.astype(jnp.float32)
  return jnp.sum(losses * w) / jnp.maximum(jnp.sum(w), 1.0)


def pixel_accuracy(
    logits: jax.Array, labels: jax.Array, ignore_label: int
) -> jax.Array:
  """Fraction of the batch's valid pixels whose argmax is their label."""
  valid = _valid(labels, ignore_label)
  right = (jnp.argmax(logits, -1) == labels) & valid
  return jnp.sum(right) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(
    labels: jax.Array,
    predictions: jax.Array,
    num_classes: int,
    ignore_label: int,
) -> jax.Array:
  """`(classes, classes)` int32 counts of valid pixels, ground truth x
  prediction, of `(..., h, w)` int labels and predictions."""
  valid = _valid(labels, ignore_label)
  index = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jnp.bincount(
      index.reshape(-1),
      weights=valid.reshape(-1).astype(jnp.int32),
      length=num_classes * num_classes,
  )
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def image_confusions(
    labels: jax.Array,
    predictions: jax.Array,
    num_classes: int,
    ignore_label: int,
) -> jax.Array:
  """`(batch, classes, classes)`: each image's `confusion_matrix`."""
  return jax.vmap(
      lambda lab, pred: confusion_matrix(lab, pred, num_classes, ignore_label)
  )(labels, predictions)


def total_confusion(confusions: jax.Array, mask: jax.Array) -> jax.Array:
  """`(classes, classes)` int32: the sum of `(batch, classes, classes)`
  image confusions over the rows where the `(batch,)` mask is > 0 (padded
  eval rows are 0). Under jit with the batch split over devices, the sum
  runs over the global batch."""
  keep = (mask > 0).astype(jnp.int32)[:, None, None]
  return jnp.sum(confusions * keep, axis=0)


def per_image(
    logits: jax.Array, labels: jax.Array, num_classes: int, ignore_label: int
) -> Dict[str, jax.Array]:
  """Each image's own figures, `(batch,)` each: 'loss' (mean pixel
  cross-entropy), 'pixel_accuracy', 'confidence' (mean top softmax
  probability), 'iou' (the image's mean IoU over the classes in its ground
  truth or prediction), 'valid_pixels', 'dominant_label' (the image's
  label for per-class gate statistics: its most frequent ground-truth class
  other than class 0, which is in nearly every image (the shapes'
  background, Cityscapes' road); 0 when it shows no other class); and
  'confusion', `(batch, classes, classes)` (`image_confusions`)."""
  logits = logits.astype(jnp.float32)
  valid = _valid(labels, ignore_label)
  w = valid.astype(jnp.float32)
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  conf = jnp.max(jax.nn.softmax(logits), axis=-1)
  cm = image_confusions(
      labels, jnp.argmax(logits, -1), num_classes, ignore_label
  )
  tp = jnp.diagonal(cm, axis1=1, axis2=2).astype(jnp.float32)
  gt = jnp.sum(cm, axis=2).astype(jnp.float32)
  pr = jnp.sum(cm, axis=1).astype(jnp.float32)
  valid_pixels = jnp.sum(gt, -1)
  n = jnp.maximum(valid_pixels, 1.0)
  union = gt + pr - tp
  present = union > 0
  iou = jnp.sum(jnp.where(present, tp / jnp.maximum(union, 1.0), 0.0), -1)
  iou = iou / jnp.maximum(jnp.sum(present, -1), 1)
  return {
      'loss': jnp.sum(ce * w, axis=(1, 2)) / n,
      'pixel_accuracy': jnp.sum(tp, -1) / n,
      'confidence': jnp.sum(conf * w, axis=(1, 2)) / n,
      'iou': iou,
      'valid_pixels': valid_pixels,
      'dominant_label': jnp.where(
          jnp.sum(gt[:, 1:], -1) > 0, jnp.argmax(gt[:, 1:], -1) + 1, 0
      ).astype(jnp.int32),
      'confusion': cm,
  }


def scores(confusion: Any) -> Dict[str, Any]:
  """mIoU and pixel accuracy of a summed confusion matrix (host numpy).

  Returns 'miou' (mean IoU of the classes that occur), 'pixel_accuracy',
  'mean_class_accuracy' (of the classes in the ground truth) and
  'class_iou' (a list, None for a class that never occurs).
  """
  cm = np.asarray(confusion, np.float64)
  tp = np.diag(cm)
  gt, pred = cm.sum(1), cm.sum(0)
  union = gt + pred - tp
  present = union > 0
  iou = np.where(present, tp / np.maximum(union, 1.0), np.nan)
  in_gt = gt > 0
  return {
      'miou': float(np.nanmean(iou)) if present.any() else 0.0,
      'pixel_accuracy': float(tp.sum() / max(cm.sum(), 1.0)),
      'mean_class_accuracy': float(np.mean(tp[in_gt] / gt[in_gt]))
      if in_gt.any()
      else 0.0,
      'class_iou': [None if np.isnan(v) else float(v) for v in iou],
  }
