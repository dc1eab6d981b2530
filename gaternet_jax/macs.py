"""Multiply-accumulates: dense per layer, and conditional on the gates.

The layers are found by tracing the model once (`jax.eval_shape`, no FLOPs)
with a Flax method interceptor that records every `nn.Conv` and `nn.Dense`
call: its path, input and output shapes, kernel and groups. A conv costs
`out_h * out_w * k_h * k_w / groups` MACs per (input channel, output
channel) pair and a dense layer one per pair.

Conditional cost: the backbone declares, per gated site, which convs produce
its channels and which read them (`backbone.gate_wiring()`). A closed gate
removes the work that produces its channel and, where a conv reads that
channel, the conv's input slice, so a layer with `i` of its `C_in` inputs
and `o` of its `C_out` outputs alive costs `coef * i * o`. With every gate
open this is exactly the dense count. Everything outside the backbone (the
GaterNet gater) and batch-shaping's gating modules are counted as overhead
that every input pays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gaternet_jax.gates import GateSpec, is_on
from gaternet_jax.models.backbone import Wiring

# Name of batch-shaping's gating module inside a unit (models/layers.py).
LOCAL_GATE_MODULE = 'gate'


@dataclasses.dataclass(frozen=True)
class GateSlice:
  """Gates `[start, stop)` of `site` act on channels from `offset` on."""

  site: str
  start: int
  stop: int
  offset: int


@dataclasses.dataclass
class Layer:
  """One conv or dense call and the gates acting on its channels."""

  path: Tuple[str, ...]
  kind: str  # 'conv' | 'dense'
  cin: int
  cout: int
  coef: int  # MACs per (input channel, output channel) pair
  overhead: bool  # the gater or a gating module: paid by every input
  gated_in: List[GateSlice] = dataclasses.field(default_factory=list)
  gated_out: List[GateSlice] = dataclasses.field(default_factory=list)

  @property
  def macs(self) -> int:
    return self.coef * self.cin * self.cout


def _record_layers(
    model: nn.Module, image_shape: Sequence[int]
) -> Tuple[List[Tuple[Tuple[str, ...], str, tuple, tuple, Any]], Any]:
  """(path, kind, input shape, output shape, module) of every conv/dense
  call of an evaluation-mode apply (init may call more: Inception-v4's
  auxiliary head), and the shapes of the variables init made."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(
        module, (nn.Conv, nn.Dense)
    ):
      kind = 'conv' if isinstance(module, nn.Conv) else 'dense'
      calls.append(
          (
              tuple(module.path),
              kind,
              tuple(args[0].shape),
              tuple(out.shape),
              module,
          )
      )
    return out

  def run():
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    variables = model.init(
        {'params': jax.random.key(0), 'gates': jax.random.key(1)},
        x,
        train=False,
    )
    calls.clear()  # Keep only the apply's calls, not init's.
    model.apply(variables, x, train=False)
    return variables

  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(run)
  return calls, variables


def _layer(path, kind, in_shape, out_shape, module) -> Layer:
  cin, cout = int(in_shape[-1]), int(out_shape[-1])
  if kind == 'conv':
    groups = int(module.feature_group_count)
    spatial = int(np.prod(out_shape[1:-1]))
    coef = spatial * int(np.prod(module.kernel_size)) // groups
  else:
    coef = int(np.prod(in_shape[1:-1])) if len(in_shape) > 2 else 1
  overhead = path[:1] != ('backbone',) or LOCAL_GATE_MODULE in path[1:]
  return Layer(path, kind, cin, cout, coef, overhead)


class MacCounter:
  """Dense and conditional MACs per image of one model at one input size.

  Attributes:
    layers: every conv and dense layer, in call order.
    dense_backbone: MACs of the backbone with every gate open (the ungated
      network's cost).
    dense_gater: MACs every input pays on top: the gater (GaterNet) or the
      gating modules (batch-shaping); 0 for a baseline.
    spec: the gate spec the conditional count reads.
  """

  def __init__(self, layers: List[Layer], spec: GateSpec):
    self.layers = layers
    self.spec = spec
    self.dense_backbone = int(sum(l.macs for l in layers if not l.overhead))
    self.dense_gater = int(sum(l.macs for l in layers if l.overhead))

  @property
  def dense_total(self) -> int:
    return self.dense_backbone + self.dense_gater

  def saved_per_sample(self, gates: Mapping[str, jax.Array]) -> jax.Array:
    """`(batch,)` float32 MACs that each input's closed gates save. Jittable.

    Only the savings are summed in float32, so an all-open PyTree gives
    exactly 0 and `dense_total - saved` stays exact in float64 on the host
    for networks far above float32's 2**24 integer range.
    """
    if not self.spec:
      return jnp.zeros((1,), jnp.float32)
    closed = {}

    def num_closed(s: GateSlice) -> jax.Array:
      key = (s.site, s.start, s.stop)
      if key not in closed:
        g = gates[s.site][:, s.start : s.stop].astype(jnp.float32)
        closed[key] = jnp.sum(1.0 - is_on(g), axis=-1)
      return closed[key]

    batch = gates[self.spec.names[0]].shape[0]
    saved = jnp.zeros((batch,), jnp.float32)
    for l in self.layers:
      if l.overhead or not (l.gated_in or l.gated_out):
        continue
      dead_in = sum((num_closed(s) for s in l.gated_in), 0.0)
      dead_out = sum((num_closed(s) for s in l.gated_out), 0.0)
      # cin * cout - (cin - dead_in) * (cout - dead_out)
      pairs = dead_in * l.cout + dead_out * l.cin - dead_in * dead_out
      saved = saved + float(l.coef) * pairs
    return saved

  def per_sample(self, gates: Mapping[str, jax.Array]) -> jax.Array:
    """`(batch,)` float32 MACs of each input given its gate PyTree: the
    conditional backbone cost plus the overhead. Jittable. Above 2**24 MACs
    float32 rounds; for exact figures use `dense_total - saved_per_sample`
    in float64."""
    return jnp.float32(self.dense_total) - self.saved_per_sample(gates)

  def per_layer(self) -> List[Dict[str, Any]]:
    """Dense MACs of each layer, as rows for a report."""
    return [
        {
            'path': '/'.join(l.path),
            'kind': l.kind,
            'cin': l.cin,
            'cout': l.cout,
            'macs': l.macs,
            'overhead': l.overhead,
            'gated': bool(l.gated_in or l.gated_out),
        }
        for l in self.layers
    ]


def _wire(
    layers: List[Layer], wiring: Wiring, spec: GateSpec, prefix: Tuple[str, ...]
):
  by_path: Dict[Tuple[str, ...], List[Layer]] = {}
  for l in layers:
    by_path.setdefault(l.path, []).append(l)
  sizes = dict(spec.sites)
  for site, wires in wiring.items():
    assert site in sizes, f'wiring names unknown site {site!r}'
    for wire in wires:
      stop = sizes[site] if wire.stop is None else wire.stop
      full = prefix + wire.path
      assert full in by_path, f'wiring names unknown layer {full}'
      for l in by_path[full]:
        limit = l.cin if wire.side == 'in' else l.cout
        assert wire.offset + stop - wire.start <= limit, (
            full,
            wire.side,
            wire.offset,
            limit,
        )
        (l.gated_in if wire.side == 'in' else l.gated_out).append(
            GateSlice(site, wire.start, stop, wire.offset)
        )


def count(
    model: nn.Module, image_shape: Sequence[int], conditional: bool = True
) -> MacCounter:
  """Traces `model` (a `GaterNet`) on one `image_shape` input.

  Args:
    model: the model.
    image_shape: `(h, w, c)` of one input.
    conditional: read the backbone's gate wiring so `per_sample` counts what
      closed gates save; False gives the dense counts of any model.

  Raises:
    NotImplementedError: `conditional`, the model is gated and its backbone's
      `gate_wiring()` raises it (conditional MACs are then unknown).
  """
  return count_with_variables(model, image_shape, conditional)[0]


def count_with_variables(
    model: nn.Module, image_shape: Sequence[int], conditional: bool = True
) -> Tuple['MacCounter', Any]:
  """`count`'s counter and the shapes (`jax.ShapeDtypeStruct`s) of the
  model's variables, from the same trace."""
  calls, variables = _record_layers(model, image_shape)
  layers = [_layer(*c) for c in calls]
  spec = model.gate_spec()
  if spec and not conditional:
    return MacCounter(layers, GateSpec()), variables
  if spec:
    _wire(layers, model.backbone.gate_wiring(), spec, ('backbone',))
  return MacCounter(layers, spec), variables


def format_macs(n: float) -> str:
  """4.11e9 -> '4.11G', 4.06e7 -> '40.6M'."""
  for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= scale:
      return f'{n / scale:.3g}{unit}'
  return f'{n:.3g}'
