"""Layers every backbone shares: conv and BN as the official code sets them
up, squeeze-and-excitation, and what happens at a gated site."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's kaiming_normal_(mode='fan_out'), the official code's conv init.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  # momentum 0.9 / eps 1e-5 are PyTorch's BatchNorm2d defaults (0.1 / 1e-5).
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int, dtype, name: str):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=[(kernel // 2, kernel // 2)] * 2, use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (Hu et al.) on `(batch, h, w, c)` features."""
  reduction: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    c = y.shape[-1]
    s = jnp.mean(y, axis=(1, 2))
    s = nn.relu(nn.Dense(max(c // self.reduction, 1), dtype=self.dtype,
                         name='fc1')(s))
    s = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name='fc2')(s))
    return y * s[:, None, None, :]


def apply_site(y: jax.Array, gate: Optional[jax.Array],
               se: Optional[nn.Module]) -> jax.Array:
  """What happens at a gated site: Eq. 4's channel mask, or SE re-scaling."""
  if se is not None:
    y = se(y)
  if gate is not None:
    assert gate.shape == (y.shape[0], y.shape[-1]), (gate.shape, y.shape)
    y = y * gate[:, None, None, :].astype(y.dtype)
  return y


