"""Training losses: cross-entropy, weight decay and the gate L1 term.

L = CE + weight_decay / 2 * ||W||^2 + lambda * ||G(x)||_1 / c  (GaterNet Eq. 5
plus weight decay). The gates are a function of the gater alone, so the L1
term sends gradient to the gater only, as the paper requires.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from gaternet_jax.gates import GateSpec, gate_l1


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: Optional[jax.Array] = None,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy of `(batch, classes)` logits and int labels.

  `weights` `(batch,)` masks padded examples (the mean is over the weights).
  """
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing) if label_smoothing else (
                                    jax.nn.one_hot(labels, num_classes))
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if weights is None:
    return jnp.mean(losses)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def decayed(path) -> bool:
  """Weight decay applies to conv and dense kernels, not to biases or BN."""
  return getattr(path[-1], 'key', None) == 'kernel'


def weight_l2(params: Any) -> jax.Array:
  """0.5 * sum of squared kernels."""
  leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
            if decayed(path)]
  return 0.5 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def total_loss(logits: jax.Array, labels: jax.Array,
               gates: Mapping[str, jax.Array], spec: GateSpec, params: Any, *,
               weight_decay: float, gate_l1_weight: float,
               label_smoothing: float = 0.0):
  """Returns (loss, terms) with terms a dict of the loss's parts."""
  ce = cross_entropy(logits, labels, label_smoothing=label_smoothing)
  l2 = weight_l2(params)
  l1 = gate_l1(gates, spec)
  loss = ce + weight_decay * l2 + gate_l1_weight * l1
  return loss, {'cross_entropy': ce, 'weight_l2': l2, 'gate_l1': l1}
