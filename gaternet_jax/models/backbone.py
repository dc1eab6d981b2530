"""The backbone contract: what a network must declare to be gated.

A backbone is a Flax module that
- names its gated sites in `gate_spec()` (the gate PyTree's structure);
- says, in `gate_wiring()`, which of its convs each site's gates act on, as
  `GateWire` entries (what `gaternet_jax.macs` needs for conditional MACs);
- says whether its units can gate themselves (`supports_local_gating`,
  batch-shaping's method) and, if so, how they do (`local_gating`, None
  when they don't);
- maps `(x, gates=None, *, train)` to `(logits, extras)`, always: `logits`
  `(batch, num_classes)` float32 (pooled features when `num_classes` is
  None), `extras` a dict holding only what the model produced:
    'gate_samples': {site: {'gate', 'value', 'prob'}} of locally gated
                    units (each `(batch, filters)` float32);
    'aux_logits':   `(batch, num_classes)` of an auxiliary classifier, in
                    training;
    'unseen_gates': `(batch,)` int32, in a compacted network
                    (models/compaction.py): how many of each input's
                    constant gates left their calibration pattern.

`GaterNet` wraps any backbone the same way; a new family implements this
docstring and registers its factory in `gaternet_jax.models.BACKBONES`.
"""

from __future__ import annotations

import dataclasses
from typing import (
    Any,
    ClassVar,
    Dict,
    Mapping,
    Optional,
    Protocol,
    Tuple,
    runtime_checkable,
)

import jax

from gaternet_jax.gates import GateSpec, Gates

# Keys of a backbone's `extras`.
GATE_SAMPLES = 'gate_samples'
AUX_LOGITS = 'aux_logits'
UNSEEN_GATES = 'unseen_gates'

Extras = Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GateWire:
  """One layer that a site's gates act on.

  Attributes:
    path: the layer's module path inside the backbone, e.g.
      `('stage1_block1', 'conv2')`.
    side: 'out' if closed gates remove the layer's output channels, 'in' if
      the layer reads the gated channels (and skips closed ones).
    offset: where the gated channels start on that side of the layer.
    start, stop: the slice of the site's gates this entry is about; `stop`
      None means the site's last gate.
  """

  path: Tuple[str, ...]
  side: str
  offset: int = 0
  start: int = 0
  stop: Optional[int] = None

  def __post_init__(self):
    assert self.side in ('out', 'in'), self.side
    object.__setattr__(self, 'path', tuple(self.path))


Wiring = Mapping[str, Tuple[GateWire, ...]]


@runtime_checkable
class Backbone(Protocol):
  """A gateable network (see the module docstring)."""

  supports_local_gating: ClassVar[bool]
  local_gating: Any  # layers.LocalGating or None.
  num_classes: Optional[int]

  def gate_spec(self) -> GateSpec:
    """The gated sites in depth order."""
    ...

  def gate_wiring(self) -> Wiring:
    """`{site: (GateWire, ...)}` for every site of `gate_spec()`."""
    ...

  def __call__(
      self, x: jax.Array, gates: Optional[Gates] = None, *, train: bool = False
  ) -> Tuple[jax.Array, Extras]:
    ...
