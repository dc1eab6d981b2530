"""Which gates of a trained model are constant, and the smaller network that
follows from it (`config.model.compaction`).

Over a calibration split every gate is always on, always off, or
input-dependent. A compacted model
- removes the filters of always-off gates (the conv's output channels, their
  BN entries and, for local gates, the next conv's input slices);
- folds always-on gates away (their filters always run);
- keeps input-dependent gates, and its gate PyTree holds only those (its
  `GateSpec` has a site per unit with any, of their number).

A compacted unit orders its kept channels input-dependent first, then always
on, so its gates act on the first channels of its gated conv; a gater's
gated outputs are added into the residual stream at their original places.
The gater and the local gating modules still compute every gate's logit:
the constant ones only to count, per image, the gates that leave the
calibration pattern (`unseen_gates`), which `--mode=eval` reports.

The config field is one string, `site=pattern,site=pattern,...`, a pattern
holding one character per gate of the uncompacted site: '1' always on, '0'
always off, '*' input-dependent.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax.gates import GateSpec, Gates, is_on

ON, OFF, DEPENDENT = '1', '0', '*'


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """One site's channels in a compacted unit.

  Attributes:
    dependent: original indices of the input-dependent gates, in order.
    on: original indices of the always-on gates.
    off: original indices of the always-off gates (filters removed).
  """

  dependent: Tuple[int, ...]
  on: Tuple[int, ...]
  off: Tuple[int, ...]

  @property
  def channels(self) -> Tuple[int, ...]:
    """Original indices of the kept channels, in the compacted order."""
    return self.dependent + self.on

  @property
  def width(self) -> int:
    return len(self.dependent) + len(self.on)

  def select(self, gates: jax.Array) -> jax.Array:
    """The input-dependent columns of a site's full `(batch, n)` gates."""
    return gates[:, np.asarray(self.dependent, np.int32)]

  def unseen(self, gates: jax.Array) -> jax.Array:
    """`(batch,)` how many of a site's full gates differ from their
    constant."""
    const = self.on + self.off
    if not const:
      return jnp.zeros(gates.shape[:1], jnp.int32)
    vals = np.asarray([True] * len(self.on) + [False] * len(self.off))
    return jnp.sum(
        is_on(gates[:, np.asarray(const)]) != vals, axis=-1, dtype=jnp.int32
    )


@dataclasses.dataclass(frozen=True)
class Compaction:
  """`((site, pattern), ...)` in depth order (see the module docstring)."""

  patterns: Tuple[Tuple[str, str], ...]

  def __post_init__(self):
    for site, pattern in self.patterns:
      bad = set(pattern) - {ON, OFF, DEPENDENT}
      if bad or not pattern:
        raise ValueError(
            f'compaction pattern of {site} must be a non-empty string of '
            f"'1' (always on), '0' (always off) and '*' (input-dependent); "
            f'got {pattern[:40]!r}.'
        )

  @classmethod
  def parse(cls, text: str) -> Optional['Compaction']:
    """The config string (see the module docstring); '' gives None."""
    text = (text or '').strip()
    if not text:
      return None
    patterns = []
    for item in text.split(','):
      site, sep, pattern = item.strip().partition('=')
      if not sep or not site:
        raise ValueError(
            f'model.compaction must read site=pattern,...; got '
            f'{item.strip()[:40]!r}.'
        )
      patterns.append((site.strip(), pattern.strip()))
    return cls(tuple(patterns))

  def text(self) -> str:
    return ','.join(f'{site}={pattern}' for site, pattern in self.patterns)

  @classmethod
  def from_on_counts(
      cls,
      spec: GateSpec,
      on_counts: np.ndarray,
      num_samples: int,
      keep_off: bool = False,
  ) -> 'Compaction':
    """From how many of `num_samples` calibration inputs had each gate on.

    `keep_off`: always-off gates stay input-dependent (their filters are
    kept, so a new input that opens one computes it exactly).
    """
    on_counts = np.asarray(on_counts)
    assert on_counts.shape == (spec.total,), (on_counts.shape, spec.total)
    patterns = []
    for name, (a, b) in spec.offsets().items():
      chars = []
      for c in on_counts[a:b]:
        if c == num_samples:
          chars.append(ON)
        elif c == 0 and not keep_off:
          chars.append(OFF)
        else:
          chars.append(DEPENDENT)
      patterns.append((name, ''.join(chars)))
    return cls(tuple(patterns))

  def site(self, name: str) -> SitePlan:
    pattern = dict(self.patterns)[name]
    pick = lambda ch: tuple(i for i, c in enumerate(pattern) if c == ch)
    return SitePlan(pick(DEPENDENT), pick(ON), pick(OFF))

  def full_spec(self) -> GateSpec:
    """The uncompacted model's gate spec."""
    return GateSpec(tuple((s, len(p)) for s, p in self.patterns))

  def spec(self) -> GateSpec:
    """The compacted model's gate spec: its input-dependent gates."""
    return GateSpec(
        tuple(
            (s, p.count(DEPENDENT)) for s, p in self.patterns if DEPENDENT in p
        )
    )

  def check(self, full: GateSpec) -> None:
    """A ValueError unless the patterns fit the model's uncompacted spec."""
    if self.full_spec() != full:
      mine = dict(self.full_spec().sites)
      theirs = dict(full.sites)
      diff = next(
          (
              f'site {s}: {mine.get(s, "none")} gates in the compaction, '
              f'{theirs.get(s, "none")} in the model'
              for s in list(theirs) + list(mine)
              if mine.get(s) != theirs.get(s)
          ),
          'the sites are in another order',
      )
      raise ValueError(
          f'model.compaction does not fit the model ({diff}); it was made '
          'for another network.'
      )

  def flat_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In the full flat gate vector: (input-dependent indices in the
    compacted spec's order, constant indices, the constants' values)."""
    dep, const, vals = [], [], []
    start = 0
    for _, pattern in self.patterns:
      for i, c in enumerate(pattern):
        if c == DEPENDENT:
          dep.append(start + i)
        else:
          const.append(start + i)
          vals.append(c == ON)
      start += len(pattern)
    return (
        np.asarray(dep, np.int32),
        np.asarray(const, np.int32),
        np.asarray(vals, bool),
    )

  def expand(self, gates: Mapping[str, jax.Array], batch: int) -> Gates:
    """The uncompacted gate PyTree of a compacted model's gates: the
    constants where the pattern has them."""
    out: Dict[str, jax.Array] = {}
    for site, pattern in self.patterns:
      full = jnp.asarray(
          np.broadcast_to(
              np.asarray([c == ON for c in pattern], np.float32),
              (batch, len(pattern)),
          )
      )
      plan = self.site(site)
      if plan.dependent:
        full = full.at[:, jnp.asarray(plan.dependent)].set(
            jnp.asarray(gates[site], jnp.float32)
        )
      out[site] = full
    return out

  def unseen(self, flat: jax.Array) -> jax.Array:
    """`(batch,)` how many constant gates of a full flat gate vector differ
    from their constant."""
    _, const, vals = self.flat_indices()
    if not const.size:
      return jnp.zeros(flat.shape[:1], jnp.int32)
    return jnp.sum(is_on(flat[:, const]) != vals, axis=-1, dtype=jnp.int32)

  def summary(self) -> Dict[str, int]:
    """Gate counts: always on, always off, input-dependent."""
    text = ''.join(p for _, p in self.patterns)
    return {
        'always_on': text.count(ON),
        'always_off': text.count(OFF),
        'input_dependent': text.count(DEPENDENT),
    }
