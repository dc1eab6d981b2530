"""Dynamic gated inference: each input computes only its open channels.

The model of models/resnet.py computes every channel of a gated site and
multiplies the closed ones by 0, so the MACs that the gates save never show
up as time. `apply` runs the same network from the same variables, but at
each gated site it gathers the open filters' weights into a dense block and
runs the smaller convs:

- batch-shaping's local gates (after a unit's `local_gating.position` conv):
  that conv computes only the open output channels (and their BN entries),
  and the conv after it reads only those;
- a gater's gates (on a unit's last conv, before the residual add): the last
  conv computes only the open output channels, which are added into the
  residual stream at their places.

Widths are bucketed so that XLA compiles a few programs rather than one per
pattern: per site, `lax.switch` over `num_buckets + 1` static widths (0, and
`num_buckets` steps up to the full width) runs the smallest one that holds
the open channels. The bucket's extra channels are closed ones, multiplied
by their gate (0) as in the masked model. Up to `per_input_batch` inputs a
batch, every input gathers its own filters (`vmap`) and the batch shares
the bucket of its largest count; larger batches compute the union of their
inputs' open channels, each input masked by its own gates. The result
equals the masked model's up to float summation order.

A gater (GaterNet) runs first, as in the masked model: `gater_gates` is
that part alone, so benchmarks can report its cost apart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import jax
from jax import lax
import jax.numpy as jnp

from gaternet_jax import gating as gating_lib
from gaternet_jax.errors import UserError
from gaternet_jax.gates import Gates, hard_gate, is_on
from gaternet_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    PreActBottleneck,
    ResNet,
)

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
_EPSILON = 1e-5  # layers.batch_norm's.


@dataclasses.dataclass(frozen=True)
class Step:
  """One conv of a residual unit's branch: conv, then BN and ReLU."""

  conv: str
  stride: int
  norm: Optional[str]
  relu: bool


@dataclasses.dataclass(frozen=True)
class UnitPlan:
  """A residual unit as a chain of `Step`s (what `apply` and compaction
  walk).

  Attributes:
    name: the unit's module name (its gate site).
    pre_norm: pre-activation units' BN(-ReLU) on the input, else None.
    steps: the branch's convs in order.
    gated: the step whose output channels the site's gates act on.
    local: True for local gates (the next step reads the gated channels),
      False for a gater's (the last step's outputs, added to the shortcut).
    projection: the unit has a 1x1 shortcut conv.
    shortcut_norm: that conv is followed by a BN.
    post_relu: a ReLU after the residual add.
  """

  name: str
  pre_norm: Optional[str]
  steps: Tuple[Step, ...]
  gated: int
  local: bool
  projection: bool
  shortcut_norm: bool
  post_relu: bool


SUPPORTED_BACKBONES = ('cifar_resnet', 'cifar_preact_resnet', 'imagenet_resnet')


def check_supported(model: Any, what: str) -> None:
  """A UserError sentence if `model` (a GaterNet) cannot run `what`
  ('dynamic execution', 'compaction')."""
  if model.gating == gating_lib.NONE:
    raise UserError(
        f'{what} needs a gated model; this config has model.gating='
        f"'none' (no gates to skip)."
    )
  backbone = model.backbone
  if not isinstance(backbone, ResNet):
    raise UserError(
        f'{what} supports the ResNet backbones '
        f'({", ".join(SUPPORTED_BACKBONES)}); not '
        f'{type(backbone).__name__}.'
    )
  if backbone.head is not None or backbone.output_stride is not None:
    raise UserError(
        f'{what} supports classification ResNets; this one is a '
        'segmentation network (model.segmentation.enabled: dilated units '
        'and a context head).'
    )
  if backbone.se_reduction:
    raise UserError(
        f'{what} does not support squeeze-and-excitation units '
        f'(model.backbone.se_reduction={backbone.se_reduction}): their '
        'scales read every channel.'
    )


def unit_plans(backbone: ResNet) -> Tuple[UnitPlan, ...]:
  """The backbone's units as `UnitPlan`s, in depth order."""
  local_gating = backbone.local_gating
  local = local_gating is not None
  position = local_gating.position if local_gating is not None else ''
  plans = []
  in_width = None
  for name, stride, features in backbone._units():  # pylint: disable=protected-access
    cls = backbone.block_cls
    steps: Tuple[Step, ...]
    if cls is BasicBlock:
      out = int(features)
      pre, steps = None, (
          Step('conv1', stride, 'bn1', True),
          Step('conv2', 1, 'bn2', False),
      )
    elif cls is Bottleneck:
      out = 4 * int(features)
      pre, steps = None, (
          Step('conv1', 1, 'bn1', True),
          Step('conv2', stride, 'bn2', True),
          Step('conv3', 1, 'bn3', False),
      )
    elif cls is PreActBottleneck:
      out = int(features[1])
      pre, steps = 'bn1', (
          Step('conv1', 1, 'bn2', True),
          Step('conv2', stride, 'bn3', True),
          Step('conv3', 1, None, False),
      )
    else:
      raise UserError(f'unsupported residual unit {cls.__name__}.')
    if in_width is None:
      in_width = backbone.stem_features()
    projection = in_width != out or stride != 1
    in_width = out
    gated = [s.conv for s in steps].index(position) if local else len(steps) - 1
    plans.append(
        UnitPlan(
            name=name,
            pre_norm=pre,
            steps=steps,
            gated=gated,
            local=local,
            projection=projection,
            shortcut_norm=cls is not PreActBottleneck,
            post_relu=cls is not PreActBottleneck,
        )
    )
  return tuple(plans)


def buckets(width: int, num_buckets: int) -> Tuple[int, ...]:
  """The static widths a site of `width` channels runs at: 0 and
  `num_buckets` steps up to `width`."""
  return tuple(
      sorted(
          {0}
          | {
              math.ceil(width * i / num_buckets)
              for i in range(1, num_buckets + 1)
          }
      )
  )


# ---------------------------------------------------------------------------
# The layers, as flax's nn.Conv / nn.BatchNorm compute them in evaluation.


def conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  k = kernel.shape[0]
  return lax.conv_general_dilated(
      x,
      kernel.astype(x.dtype),
      (stride, stride),
      [(k // 2, k // 2)] * 2,
      dimension_numbers=_DIMENSIONS,
  )


def batch_norm(
    x: jax.Array,
    params: Mapping[str, jax.Array],
    stats: Mapping[str, jax.Array],
    index: Optional[jax.Array] = None,
) -> jax.Array:
  """Evaluation-mode BN (flax's arithmetic), of channels `index` if given."""

  def pick(v):
    v = v if index is None else v[index]
    return v.astype(x.dtype)

  mul = lax.rsqrt(pick(stats['var']) + _EPSILON) * pick(params['scale'])
  return (x - pick(stats['mean'])) * mul + pick(params['bias'])


def _open_first(gate: jax.Array, width: int) -> jax.Array:
  """Indices of the `width` channels to compute: the open ones first (in
  channel order), then closed ones to fill the bucket."""
  closed = jnp.logical_not(is_on(gate)).astype(jnp.int32)
  return jnp.argsort(closed, stable=True)[:width]


def _gated_segment(
    plan: UnitPlan,
    p,
    s,
    y: jax.Array,
    index: jax.Array,
    g: jax.Array,
    shortcut: Optional[jax.Array],
) -> jax.Array:
  """The gated part of a unit on channels `index` only.

  `g`: `(batch, len(index))` the gates of those channels. Local gates: the
  gated step and the next conv (without its BN), `y` the gated step's
  input; returns the next conv's output. A gater's gates: the last step,
  then the add into `shortcut`; returns the sum.
  """
  step = plan.steps[plan.gated]
  y = conv(y, p[step.conv]['kernel'][..., index], step.stride)
  if step.norm is not None:
    y = batch_norm(y, p[step.norm], s[step.norm], index)
  if step.relu:
    y = jax.nn.relu(y)
  y = y * g[:, None, None, :].astype(y.dtype)
  if plan.local:
    reader = plan.steps[plan.gated + 1]
    return conv(y, p[reader.conv]['kernel'][:, :, index, :], reader.stride)
  assert shortcut is not None
  return shortcut.at[..., index].add(y)


def _switch(
    plan: UnitPlan,
    p,
    s,
    y: jax.Array,
    gate: jax.Array,
    shortcut: Optional[jax.Array],
    widths: Tuple[int, ...],
    per_input_batch: int,
) -> jax.Array:
  """`_gated_segment` at the smallest of `widths` that holds the open
  channels: each input's own (gathered per input) for batches of up to
  `per_input_batch`, else the batch's union."""
  batch = y.shape[0]
  union = batch > per_input_batch
  opened = is_on(gate)
  if union:
    count = jnp.sum(jnp.any(opened, axis=0))
  else:
    count = jnp.max(jnp.sum(opened, axis=-1))
  branch_index = jnp.searchsorted(jnp.asarray(widths), count)

  def branch(width):
    def run(y, gate, shortcut):
      if union:
        index = _open_first(jnp.max(gate, axis=0), width)
        return _gated_segment(plan, p, s, y, index, gate[:, index], shortcut)

      def one(y, gate, shortcut):
        index = _open_first(gate, width)
        return _gated_segment(
            plan,
            p,
            s,
            y[None],
            index,
            gate[None, index],
            None if shortcut is None else shortcut[None],
        )[0]

      if batch == 1:
        return one(y[0], gate[0], None if shortcut is None else shortcut[0])[
            None
        ]
      return jax.vmap(one)(y, gate, shortcut)

    return run

  return lax.switch(
      branch_index, [branch(w) for w in widths], y, gate, shortcut
  )


def _unit(
    plan: UnitPlan,
    p,
    s,
    x: jax.Array,
    gate: Optional[jax.Array],
    widths: Tuple[int, ...],
    per_input_batch: int,
) -> jax.Array:
  """One residual unit; `gate` None runs it dense."""
  y = x
  if plan.pre_norm is not None:
    y = jax.nn.relu(batch_norm(x, p[plan.pre_norm], s[plan.pre_norm]))
  shortcut = x
  if plan.projection:
    stride = max(step.stride for step in plan.steps)
    shortcut = conv(
        y if plan.pre_norm else x, p['shortcut_conv']['kernel'], stride
    )
    if plan.shortcut_norm:
      shortcut = batch_norm(shortcut, p['shortcut_bn'], s['shortcut_bn'])
  i = 0
  while i < len(plan.steps):
    step = plan.steps[i]
    if gate is not None and i == plan.gated:
      y = _switch(
          plan,
          p,
          s,
          y,
          gate,
          None if plan.local else shortcut,
          widths,
          per_input_batch,
      )
      if not plan.local:
        return jax.nn.relu(y) if plan.post_relu else y
      i += 1  # The gated segment ran the next conv too.
      step = plan.steps[i]
    else:
      y = conv(y, p[step.conv]['kernel'], step.stride)
    if step.norm is not None:
      y = batch_norm(y, p[step.norm], s[step.norm])
    if step.relu:
      y = jax.nn.relu(y)
    i += 1
  y = y + shortcut
  return jax.nn.relu(y) if plan.post_relu else y


def _local_gate(backbone: ResNet, p, s, x: jax.Array, width: int) -> jax.Array:
  """A unit's binary local gates from its input (evaluation mode)."""
  assert backbone.local_gating is not None
  module = backbone.local_gating.module(width, backbone.dtype)
  sample: Any = module.apply(
      {'params': p['gate'], 'batch_stats': s['gate']}, x, train=False
  )
  return sample['gate']


def _gater_gates(module, images: jax.Array) -> Gates:
  spec = module.backbone.gate_spec()
  logits = module.gater(images, train=False)
  return spec.unflatten(hard_gate(logits, module.binarize))


def gater_gates(model: Any, variables: Any, images: jax.Array) -> Gates:
  """A GaterNet's evaluation gates of `images`: its gater alone."""
  return model.apply(variables, images, method=_gater_gates)


def backbone_apply(
    model: Any,
    variables: Any,
    images: jax.Array,
    gates: Optional[Gates] = None,
    num_buckets: int = 8,
    per_input_batch: int = 8,
) -> Tuple[jax.Array, Gates]:
  """(logits, gates) of the backbone run dynamically (evaluation mode).

  Args:
    model: a gated `GaterNet` whose backbone is a ResNet
      (`check_supported`).
    variables: its variables ({'params', 'batch_stats'}).
    images: `(batch, h, w, c)` normalised images.
    gates: the gate PyTree to run: required for a gater's model (see
      `gater_gates`); for local gates None uses the units' own, a PyTree
      replaces them (their modules still run).
    num_buckets: static widths per site (see the module docstring).
    per_input_batch: batches up to this size gather each input's own
      filters; larger ones compute the union of the batch's open channels
      (per-input weights would be `batch` copies of the network).
  """
  backbone = model.backbone
  params = variables['params']['backbone']
  stats = variables['batch_stats']['backbone']
  if gates is None and backbone.local_gating is None:
    raise ValueError('a gater model runs dynamically on given gates.')
  sizes = dict(backbone.gate_spec().sites)
  y = images.astype(backbone.dtype)
  preact = backbone.block_cls is PreActBottleneck
  if backbone.stem == 'imagenet':
    y = conv(y, params['conv']['kernel'], 2)
    y = jax.nn.relu(batch_norm(y, params['bn'], stats['bn']))
    y = lax.reduce_window(
        y,
        -jnp.inf,
        lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )
  else:
    y = conv(y, params['conv']['kernel'], 1)
    if not preact:
      y = jax.nn.relu(batch_norm(y, params['bn'], stats['bn']))
  used = {}
  for plan in unit_plans(backbone):
    p, s = params[plan.name], stats[plan.name]
    if gates is not None:
      gate = gates[plan.name]
    else:
      gate = _local_gate(backbone, p, s, y, sizes[plan.name])
    used[plan.name] = gate
    y = _unit(
        plan,
        p,
        s,
        y,
        gate,
        buckets(sizes[plan.name], num_buckets),
        per_input_batch,
    )
  if preact:
    y = jax.nn.relu(batch_norm(y, params['bn_final'], stats['bn_final']))
  y = jnp.mean(y, axis=(1, 2))
  if backbone.num_classes is not None:
    fc = params['fc']
    y = y @ fc['kernel'].astype(y.dtype) + fc['bias'].astype(y.dtype)
  return y.astype(jnp.float32), used


def apply(
    model: Any,
    variables: Any,
    images: jax.Array,
    gates: Optional[Gates] = None,
    num_buckets: int = 8,
    per_input_batch: int = 8,
) -> Tuple[jax.Array, Gates]:
  """(logits, gates) of the whole model run dynamically: a GaterNet's
  gater first (unless `gates` are given), then `backbone_apply`."""
  if gates is None and model.gating == gating_lib.GATER:
    gates = gater_gates(model, variables, images)
  return backbone_apply(
      model, variables, images, gates, num_buckets, per_input_batch
  )


def masked_backbone(
    model: Any, variables: Any, images: jax.Array, gates: Gates
) -> jax.Array:
  """The masked model's logits on a given gate PyTree (the reference
  `apply` equals)."""

  def run(module, images, gates):
    return module.backbone(images, gates, train=False)[0]

  return model.apply(variables, images, gates, method=run)


__all__ = [
    'SUPPORTED_BACKBONES',
    'Step',
    'UnitPlan',
    'apply',
    'backbone_apply',
    'batch_norm',
    'buckets',
    'check_supported',
    'conv',
    'gater_gates',
    'masked_backbone',
    'unit_plans',
]
