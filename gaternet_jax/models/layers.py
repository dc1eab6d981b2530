"""Layers every backbone shares: conv and BN as the official code sets them
up, squeeze-and-excitation, what happens at a gated site, and batch-shaping's
local gating module."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax.gates import gumbel_sigmoid

# PyTorch's kaiming_normal_(mode='fan_out'), the official code's conv init.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, dtype, name: str) -> nn.BatchNorm:
  # momentum 0.9 / eps 1e-5 are PyTorch's BatchNorm2d defaults (0.1 / 1e-5).
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      name=name,
  )


def conv(
    features: int, kernel: int, stride: int, dtype, name: str, dilation: int = 1
):
  pad = dilation * (kernel // 2)
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=[(pad, pad)] * 2,
      kernel_dilation=(dilation, dilation),
      use_bias=False,
      kernel_init=conv_init,
      dtype=dtype,
      name=name,
  )


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation (Hu et al.) on `(batch, h, w, c)` features."""

  reduction: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    c = y.shape[-1]
    s = jnp.mean(y, axis=(1, 2))
    s = nn.relu(
        nn.Dense(max(c // self.reduction, 1), dtype=self.dtype, name='fc1')(s)
    )
    s = nn.sigmoid(nn.Dense(c, dtype=self.dtype, name='fc2')(s))
    return y * s[:, None, None, :]


def apply_site(
    y: jax.Array, gate: Optional[jax.Array], se: Optional[nn.Module]
) -> jax.Array:
  """What happens at a gated site: Eq. 4's channel mask, or SE re-scaling."""
  if se is not None:
    y = se(y)
  if gate is not None:
    y = gate_channels(y, gate)
  return y


@dataclasses.dataclass(frozen=True)
class LocalGating:
  """How residual units gate themselves (batch-shaping's channel gating).

  Attributes:
    position: the conv whose output channels are gated (after its BN and
      ReLU): 'conv1' (basic blocks: the only choice; bottlenecks: between
      the 1x1 and the 3x3) or 'conv2' (bottlenecks: between the 3x3 and the
      last 1x1). The next conv then reads only the open channels.
    hidden: units of the gating module's hidden layer (16 in the paper).
    temperature: of the Gumbel-sigmoid relaxation (2/3 in the paper).
    bias_init: initial bias of the gate logits. 0 (the default) starts
      every gate on for half the inputs, where the Beta prior's CDF is
      steep and the batch-shaping loss has most to say; > 0 starts gates
      mostly on (on the digits demo a bias of 2 left 99% of the gates on
      after the batch-shaping phase, 0 left 78%).
  """

  position: str = 'conv1'
  hidden: int = 16
  temperature: float = 2.0 / 3.0
  bias_init: float = 0.0

  def __post_init__(self):
    if self.position not in ('conv1', 'conv2'):
      raise ValueError(
          f"local_gating.position must be 'conv1' or 'conv2'; "
          f'got {self.position!r}.'
      )
    if self.hidden < 1 or not self.temperature > 0:
      raise ValueError(
          f'local_gating needs hidden >= 1 and temperature > 0;'
          f' got {self.hidden} and {self.temperature}.'
      )

  def module(self, features: int, dtype, name: str = 'gate') -> 'LocalGate':
    return LocalGate(
        features,
        self.hidden,
        self.temperature,
        self.bias_init,
        dtype,
        name=name,
    )


def parse_local_gating(
    cfg: Union[None, Mapping[str, Any], LocalGating],
) -> Optional[LocalGating]:
  """A config's `local_gating` (None/empty: the unit is not self-gated)."""
  if cfg is None or isinstance(cfg, LocalGating):
    return cfg
  cfg = dict(cfg)
  if not cfg or not cfg.pop('enabled', True):
    return None
  return LocalGating(**cfg)


class LocalGate(nn.Module):
  """Batch-shaping's per-block gating module (Bejnordi et al., 2020).

  Reads the block's input: global average pool -> FC(hidden) -> BatchNorm ->
  ReLU -> FC(features) gate logits, then a straight-through Gumbel-sigmoid
  sample in training and 1(logit > 0) in evaluation (rng stream 'gates').

  Returns `{'gate', 'value', 'prob'}`, each `(batch, features)` float32: the
  binary gates, their relaxed values (for the batch-shaping loss) and the
  probability of each gate being on, sigmoid(logit) (for the L0 loss).
  """

  features: int
  hidden: int = 16
  temperature: float = 2.0 / 3.0
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> Dict[str, jax.Array]:
    s = jnp.mean(x, axis=(1, 2))
    h = nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(s)
    h = nn.relu(batch_norm(train, self.dtype, 'bn')(h))
    logits = nn.Dense(
        self.features,
        dtype=self.dtype,
        name='fc2',
        bias_init=nn.initializers.constant(self.bias_init),
    )(h)
    logits = logits.astype(jnp.float32)
    rng = self.make_rng('gates') if train else None
    gate, value = gumbel_sigmoid(
        logits, rng=rng, train=train, temperature=self.temperature
    )
    return {'gate': gate, 'value': value, 'prob': jax.nn.sigmoid(logits)}


def gate_channels(y: jax.Array, gate: jax.Array) -> jax.Array:
  """Multiplies `(batch, h, w, c)` features by `(batch, c)` gates."""
  assert gate.shape == (y.shape[0], y.shape[-1]), (gate.shape, y.shape)
  return y * gate[:, None, None, :].astype(y.dtype)
