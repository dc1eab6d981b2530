"""The gate PyTree and the gate functions: Improved SemHash (GaterNet) and the
straight-through Gumbel-sigmoid (batch-shaping).

A backbone declares its gated sites in a `GateSpec`: an ordered list of
`(site_name, num_filters)`. A gate PyTree is a dict mapping every site name to
a `(batch, num_filters)` array of gates in [0, 1] (binary at evaluation). The
spec's order is the depth order of the sites and the order of the gater's flat
output vector; every consumer (losses, statistics, analysis) iterates the spec
rather than assuming a model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Iterator, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Gates = Dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class GateSpec:
  """Ordered gated sites of a backbone: `((name, num_filters), ...)`."""

  sites: Tuple[Tuple[str, int], ...] = ()

  def __post_init__(self):
    names = [name for name, _ in self.sites]
    assert len(set(names)) == len(names), f'duplicate gate sites: {names}'
    assert all(n > 0 for _, n in self.sites), self.sites

  @property
  def names(self) -> Tuple[str, ...]:
    return tuple(name for name, _ in self.sites)

  @property
  def sizes(self) -> Tuple[int, ...]:
    return tuple(n for _, n in self.sites)

  @property
  def total(self) -> int:
    """Number of gated filters c (the size of the gate vector)."""
    return int(sum(self.sizes))

  def __len__(self) -> int:
    return len(self.sites)

  def __iter__(self) -> Iterator[Tuple[str, int]]:
    return iter(self.sites)

  def __bool__(self) -> bool:
    return bool(self.sites)

  def offsets(self) -> Dict[str, Tuple[int, int]]:
    """`{name: (start, stop)}` of each site in the flat gate vector."""
    out, start = {}, 0
    for name, n in self.sites:
      out[name] = (start, start + n)
      start += n
    return out

  def unflatten(self, flat: jax.Array) -> Gates:
    """`(batch, total)` gate vector -> gate PyTree `{site: (batch, n)}`."""
    assert flat.shape[-1] == self.total, (flat.shape, self.total)
    return {name: flat[..., a:b] for name, (a, b) in self.offsets().items()}

  def flatten(self, gates: Mapping[str, jax.Array]) -> jax.Array:
    """Gate PyTree -> `(batch, total)` vector, sites in depth order."""
    missing = set(self.names) - set(gates)
    assert not missing, f'gate PyTree lacks sites {sorted(missing)}'
    return jnp.concatenate([gates[name] for name in self.names], axis=-1)

  def ones(self, batch: int, dtype=jnp.float32) -> Gates:
    """All-open gates: the backbone then computes its dense function."""
    return {name: jnp.ones((batch, n), dtype) for name, n in self.sites}


def saturating_sigmoid(x: jax.Array) -> jax.Array:
  """sigma'(x) = max(0, min(1, 1.2 * sigmoid(x) - 0.1))."""
  return jnp.clip(1.2 * jax.nn.sigmoid(x) - 0.1, 0.0, 1.0)


# How Improved SemHash's binary gates g_beta are cut from the logits:
# 'paper' is the paper's 1(x > 0); 'official' the official code's
# saturating_sigmoid(x) > 0.49999 (x > about -3.3e-5), which an imported
# official checkpoint needs to reproduce its gates exactly.
BINARIZE_RULES = ('paper', 'official')
OFFICIAL_THRESHOLD = 0.49999


def is_on(gates):
  """Which entries of a gate array are on: g > 0.5.

  The one threshold on gate values, for binary gates and for SemHash's or
  the Gumbel-sigmoid's continuous training-time values alike; works on
  numpy and jax arrays.
  """
  return gates > 0.5


def binarize(x: jax.Array, rule: str = 'paper') -> jax.Array:
  """g_beta of logits `x` under `rule` (BINARIZE_RULES), as `x`'s dtype."""
  if rule == 'official':
    on = saturating_sigmoid(x) > OFFICIAL_THRESHOLD
  elif rule == 'paper':
    on = x > 0
  else:
    raise ValueError(
        f'binarize rule must be one of {BINARIZE_RULES}; got ' f'{rule!r}.'
    )
  return on.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def hard_gate(x: jax.Array, rule: str = 'paper') -> jax.Array:
  """g_beta = binarize(x, rule), whose gradient is taken to be that of
  g_alpha."""
  return binarize(x, rule)


def _hard_gate_fwd(x, rule):
  return hard_gate(x, rule), x


def _hard_gate_bwd(rule, x, g):
  del rule
  # Straight-through: d g_beta / dx := d saturating_sigmoid(x) / dx.
  _, vjp = jax.vjp(saturating_sigmoid, x)
  return vjp(g)


hard_gate.defvjp(_hard_gate_fwd, _hard_gate_bwd)


def improved_semhash(
    logits: jax.Array,
    *,
    rng: Optional[jax.Array],
    train: bool,
    mix_prob: float = 0.5,
    noise_std: float = 1.0,
    rule: str = 'paper',
) -> jax.Array:
  """Improved SemHash gates (GaterNet section 3.2.2).

  Args:
    logits: `(batch, ...)` real-valued gate logits g'.
    rng: PRNG key; needed when `train` is True.
    train: in training, Gaussian noise is added and each SAMPLE uses the
      continuous g_alpha or the binary g_beta (with probability `mix_prob`);
      g_beta back-propagates g_alpha's gradient. In evaluation, no noise and
      always g_beta.
    mix_prob: probability that a sample uses the binary gates in training.
    noise_std: standard deviation of the training noise.
    rule: how g_beta is cut from the logits (`binarize`).

  Returns:
    Gates of `logits`' shape and dtype, in [0, 1].
  """
  if not train:
    return hard_gate(logits, rule)
  if rng is None:
    raise ValueError('improved_semhash needs an rng in training mode.')
  noise_rng, mix_rng = jax.random.split(rng)
  noisy = logits + noise_std * jax.random.normal(
      noise_rng, logits.shape, logits.dtype
  )
  g_alpha = saturating_sigmoid(noisy)
  g_beta = hard_gate(noisy, rule)
  # One Bernoulli draw per sample, broadcast over that sample's gates.
  mix_shape = (logits.shape[0],) + (1,) * (logits.ndim - 1)
  use_beta = jax.random.bernoulli(mix_rng, mix_prob, mix_shape)
  return jnp.where(use_beta, g_beta, g_alpha)


@jax.custom_vjp
def straight_through_step(x: jax.Array) -> jax.Array:
  """1(x > 0.5) forward; the identity's gradient backward."""
  return is_on(x).astype(x.dtype)


def _st_step_fwd(x):
  return straight_through_step(x), None


def _st_step_bwd(_, g):
  return (g,)


straight_through_step.defvjp(_st_step_fwd, _st_step_bwd)


def gumbel_sigmoid(
    logits: jax.Array,
    *,
    rng: Optional[jax.Array],
    train: bool,
    temperature: float = 2.0 / 3.0,
) -> Tuple[jax.Array, jax.Array]:
  """Batch-shaping's gates: a binary concrete sample, thresholded at 0.5.

  Training draws u ~ U(0, 1) per gate and forms the relaxed sample
  s = sigmoid((logit + log u - log(1 - u)) / temperature); the gate is
  1(s > 0.5) with the straight-through gradient ds. Evaluation is
  deterministic: s = sigmoid(logit / temperature), gate = 1(logit > 0).

  Args:
    logits: `(batch, ...)` gate logits.
    rng: PRNG key; needed when `train` is True.
    train: sample (True) or threshold the logits (False).
    temperature: of the relaxation (2/3 in the paper).

  Returns:
    (gates, relaxed values `s`), both of `logits`' shape and dtype; the
    relaxed values are what the batch-shaping loss shapes.
  """
  if not train:
    soft = jax.nn.sigmoid(logits / temperature)
    return (logits > 0).astype(logits.dtype), soft
  if rng is None:
    raise ValueError('gumbel_sigmoid needs an rng in training mode.')
  tiny = jnp.finfo(logits.dtype).tiny
  u = jax.random.uniform(rng, logits.shape, logits.dtype, tiny, 1.0 - 1e-7)
  soft = jax.nn.sigmoid((logits + jnp.log(u) - jnp.log1p(-u)) / temperature)
  return straight_through_step(soft), soft


# ---------------------------------------------------------------------------
# Statistics over the gate PyTree (consumed by eval and analysis).


def gate_l1(gates: Mapping[str, jax.Array], spec: GateSpec) -> jax.Array:
  """||G(x)||_1 / c averaged over the batch; 0 for an empty spec."""
  if not spec:
    return jnp.zeros((), jnp.float32)
  total = sum(
      jnp.sum(gates[name].astype(jnp.float32), axis=-1) for name in spec.names
  )
  return jnp.mean(total) / spec.total


def gate_on_counts(
    gates: Mapping[str, jax.Array],
    spec: GateSpec,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
  """Per gate, how many (unmasked) samples have it on: `(total,)` int32."""
  flat = is_on(spec.flatten(gates))
  if mask is not None:
    flat = flat & (mask[:, None] > 0)
  return jnp.sum(flat, axis=0, dtype=jnp.int32)


def gate_type_counts(
    on_counts: np.ndarray, num_samples: int, spec: GateSpec
) -> Dict[str, Dict[str, int]]:
  """Always-on / always-off / input-dependent counts, per site and in total.

  Args:
    on_counts: `(total,)` number of samples for which each gate was on.
    num_samples: number of samples the counts were taken over.
    spec: the gate spec the counts are laid out by.

  Returns:
    `{site or 'total': {'always_on', 'always_off', 'input_dependent'}}`.
  """
  on_counts = np.asarray(on_counts)
  assert on_counts.shape == (spec.total,), (on_counts.shape, spec.total)

  def kinds(c):
    on = int(np.sum(c == num_samples))
    off = int(np.sum(c == 0))
    return {
        'always_on': on,
        'always_off': off,
        'input_dependent': int(c.size) - on - off,
    }

  out = {name: kinds(on_counts[a:b]) for name, (a, b) in spec.offsets().items()}
  out['total'] = kinds(on_counts)
  return out


def drop_gates(
    gates: Mapping[str, jax.Array],
    spec: GateSpec,
    rate: jax.Array,
    rng: jax.Array,
) -> Gates:
  """Dropout on the gate vector (GaterNet Appendix B's scheduled dropout).

  Each gate is closed with probability `rate` (a scalar, possibly traced).
  Survivors are not rescaled: a gate is a binary choice of a filter, and
  evaluation uses the gates as they are.
  """
  flat = spec.flatten(gates)
  keep = jax.random.bernoulli(rng, 1.0 - rate, flat.shape)
  return spec.unflatten(flat * keep.astype(flat.dtype))
