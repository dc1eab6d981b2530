"""Training losses: cross-entropy, weight decay and the gate losses, and
`objective(config)`, the one place they are composed into a run's loss.

GaterNet: L = CE + weight_decay / 2 * ||W||^2 + lambda * ||G(x)||_1 / c
(Eq. 5 plus weight decay). The gates are a function of the gater alone, so
the L1 term sends gradient to the gater only, as the paper requires.

Batch-shaping (Bejnordi et al., 2020): L = CE + weight decay
+ gamma(t) * batch_shaping_loss(relaxed gate values) + lambda(t) * L0, with
L0 the mean probability of a gate being on; gamma and lambda follow the
schedules of `gate_loss_weights`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gaternet_jax import gating
from gaternet_jax import segmentation
from gaternet_jax.errors import ConfigError
from gaternet_jax.gates import GateSpec, gate_l1


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: Optional[jax.Array] = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Mean softmax cross-entropy of `(batch, classes)` logits and int labels.

  `weights` `(batch,)` masks padded examples (the mean is over the weights).
  """
  num_classes = logits.shape[-1]
  targets = (
      optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
      if label_smoothing
      else (jax.nn.one_hot(labels, num_classes))
  )
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is None:
    return jnp.mean(losses)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def decayed(path) -> bool:
  """Weight decay applies to conv and dense kernels, not to biases or BN."""
  return getattr(path[-1], 'key', None) == 'kernel'


def weight_l2(params: Any) -> jax.Array:
  """0.5 * sum of squared kernels."""
  leaves = [
      x
      for path, x in jax.tree_util.tree_leaves_with_path(params)
      if decayed(path)
  ]
  return 0.5 * jnp.asarray(
      sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves),
      jnp.float32,
  )


def objective(
    config: ml_collections.ConfigDict, spec: GateSpec, steps_per_epoch: int = 1
) -> Callable[..., Tuple[jax.Array, Dict[str, Any]]]:
  """The training loss of `config`: the one place it is composed.

  L = CE (label-smoothed by `label_smoothing`; for segmentation the mean
      over the batch's pixels not labelled `data.ignore_label`)
      + weight_decay * weight_l2(params)
      + gate_l1_weight * gate_l1(G(x))                       (GaterNet, Eq. 5)
      + aux_loss_weight * CE(auxiliary logits)              (if the model has
                                                             them)
      + gamma(t) * batch_shaping + lambda(t) * L0           (local gates, when
                                                             either weight is
                                                             set; `gate_loss_
                                                             weights`)

  Args:
    config: the experiment config.
    spec: the model's gate spec.
    steps_per_epoch: to turn the gate losses' epoch schedules into steps.

  Returns:
    `loss_fn(params, logits, out, labels, step) -> (loss, terms)`, where
    `out` is the model's second output (`GaterNet.__call__`) and `terms`
    holds each part, the weights that vary in time, and 'loss'.
  """
  smoothing = config.label_smoothing
  weight_decay, l1_weight = config.weight_decay, config.gate_l1_weight
  # Segmentation: per-pixel CE over the pixels not labelled ignore_label.
  ignore = (
      int(config.data.ignore_label) if segmentation.enabled(config) else None
  )
  aux_weight = config.aux_loss_weight
  shaping = gating.gate_losses_enabled(config)
  if shaping and not (
      config.batch_shaping.a > 0 and config.batch_shaping.b > 0
  ):
    raise ConfigError(
        f'batch_shaping.a and .b must be > 0; got '
        f'{config.batch_shaping.a}, {config.batch_shaping.b}.'
    )

  def loss_fn(
      params: Any,
      logits: jax.Array,
      out: Mapping[str, Any],
      labels: jax.Array,
      step: jax.Array,
  ):
    if ignore is not None:
      ce = segmentation.pixel_cross_entropy(logits, labels, ignore, smoothing)
    else:
      ce = cross_entropy(logits, labels, label_smoothing=smoothing)
    l2 = weight_l2(params)
    l1 = gate_l1(out['gates'], spec)
    loss = ce + weight_decay * l2 + l1_weight * l1
    terms = {'cross_entropy': ce, 'weight_l2': l2, 'gate_l1': l1}
    if 'aux_logits' in out:
      terms['aux_cross_entropy'] = cross_entropy(
          out['aux_logits'], labels, label_smoothing=smoothing
      )
      loss = loss + aux_weight * terms['aux_cross_entropy']
    if shaping:
      weights = gate_loss_weights(config, step, steps_per_epoch)
      terms['batch_shaping'] = batch_shaping_loss(
          spec.flatten(out['gate_values']),
          config.batch_shaping.a,
          config.batch_shaping.b,
      )
      terms['l0'] = l0_loss(spec.flatten(out['gate_probs']))
      terms['batch_shaping_weight'] = weights['batch_shaping']
      terms['l0_weight'] = weights['l0']
      loss = (
          loss
          + weights['batch_shaping'] * terms['batch_shaping']
          + weights['l0'] * terms['l0']
      )
    return loss, dict(terms, loss=loss)

  return loss_fn


# ---------------------------------------------------------------------------
# Batch-shaping.

# The Beta pdf (the CDF's derivative) is clipped to this range so gradients
# stay finite where it diverges (x -> 0 for a < 1, x -> 1 for b < 1).
PDF_CLIP = (1e-3, 100.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def beta_cdf(x: jax.Array, a: float, b: float) -> jax.Array:
  """The Beta(a, b) CDF, I_x(a, b), with the clipped pdf as its derivative."""
  return jax.scipy.special.betainc(a, b, jnp.clip(x, 0.0, 1.0))


@beta_cdf.defjvp
def _beta_cdf_jvp(a, b, primals, tangents):
  (x,), (dx,) = primals, tangents
  xc = jnp.clip(x, 0.0, 1.0)
  # xlogy/xlog1py: 0 * log(0) = 0 when a or b is 1.
  log_pdf = (
      jax.scipy.special.xlogy(a - 1.0, xc)
      + jax.scipy.special.xlog1py(b - 1.0, -xc)
      - jax.scipy.special.betaln(a, b)
  )
  pdf = jnp.clip(jnp.exp(log_pdf), *PDF_CLIP)
  return beta_cdf(x, a, b), pdf * dx


def batch_shaping_loss(
    values: jax.Array, a: float = 0.6, b: float = 0.4
) -> jax.Array:
  """Distance of each gate's distribution over the batch to a Beta prior.

  For every gate (column), sorts its values x_(1) <= ... <= x_(N) over the
  batch and takes (1/N) sum_i (F(x_(i)) - i / (N + 1))^2, F the Beta(a, b)
  CDF: the squared distance between the prior's CDF and the empirical one
  (a Cramer-von Mises statistic). Returns the mean over gates.

  Args:
    values: `(batch, gates)` values in [0, 1] (the relaxed gates). The sort
      is over the whole leading axis, so under `jit` with the batch split over
      devices it is a global-batch sort (XLA gathers what it needs).
    a, b: the Beta prior's parameters (default: mean 0.6, U-shaped).

  Returns:
    A float32 scalar.
  """
  values = values.astype(jnp.float32)
  n = values.shape[0]
  ranks = jnp.arange(1, n + 1, dtype=jnp.float32) / (n + 1)
  cdf = beta_cdf(jnp.sort(values, axis=0), a, b)
  return jnp.mean(jnp.square(cdf - ranks[:, None]))


def l0_loss(probs: jax.Array) -> jax.Array:
  """Mean probability of a gate being on (the expected fraction of open
  gates), over the batch and all gates of `(batch, gates)` probabilities."""
  return jnp.mean(probs.astype(jnp.float32))


def _ramp(step: jax.Array, start: float, end: float) -> jax.Array:
  """0 before `start`, 1 after `end`, linear in between (steps)."""
  if end <= start:
    return (step >= start).astype(jnp.float32)
  return jnp.clip((step - start) / (end - start), 0.0, 1.0)


def gate_loss_weights(
    cfg: ml_collections.ConfigDict, step: jax.Array, steps_per_epoch: int
) -> Dict[str, jax.Array]:
  """Batch-shaping's and L0's weights at `step` (epochs in the config).

  batch_shaping.weight holds from the start until `decay_start_epoch`, then
  falls linearly to `final_weight` at `decay_end_epoch`. l0.weight is 0
  until `start_epoch` (after the batch-shaping phase) and ramps linearly to
  its full value over `ramp_epochs`.
  """
  step = jnp.asarray(step, jnp.float32)
  e = float(steps_per_epoch)
  bs = cfg.batch_shaping
  fall = _ramp(step, bs.decay_start_epoch * e, bs.decay_end_epoch * e)
  bs_w = bs.weight + (bs.final_weight - bs.weight) * fall
  l0 = cfg.l0
  l0_w = l0.weight * _ramp(
      step, l0.start_epoch * e, (l0.start_epoch + l0.ramp_epochs) * e
  )
  return {'batch_shaping': bs_w, 'l0': l0_w}
