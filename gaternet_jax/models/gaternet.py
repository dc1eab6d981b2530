"""GaterNet: a gater network selects the backbone's filters per input.

One `apply` runs the whole model: images -> gater -> gate logits ->
Improved SemHash -> gate PyTree -> backbone -> logits. The backbone with no
gater is the plain baseline, so baseline and gated models share parameter
names under 'backbone' and a trained baseline initialises a gated model.

The same wrapper runs batch-shaping's channel-gated networks (gating
'local': a backbone with `local_gating`): there the backbone's units make
their own gates, and the wrapper returns them as the same gate PyTree, so
losses, statistics, MAC accounting and analysis treat both methods alike.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gaternet_jax import gating as gating_lib
from gaternet_jax.gates import GateSpec, drop_gates, improved_semhash
from gaternet_jax.models.backbone import GATE_SAMPLES, UNSEEN_GATES
from gaternet_jax.models.compaction import Compaction
from gaternet_jax.models.layers import batch_norm


class Gater(nn.Module):
  """G(x) = D(E(x)) up to the binarisation: images -> `(batch, c)` logits.

  E is `features` (a backbone with no output layer); D is
  FC1 (to the bottleneck b) -> [BatchNorm] -> ReLU -> FC2 (to c logits).
  The official GaterNet code has no BatchNorm there; the paper does.
  """

  features: nn.Module
  num_gates: int
  bottleneck: int = 8
  batchnorm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    f, _ = self.features(images, train=train)
    h = nn.Dense(self.bottleneck, dtype=self.dtype, name='fc1')(f)
    if self.batchnorm:
      h = batch_norm(train, self.dtype, 'bn')(h)
    h = nn.relu(h)
    logits = nn.Dense(self.num_gates, dtype=self.dtype, name='fc2')(h)
    return logits.astype(jnp.float32)


class GaterNet(nn.Module):
  """Backbone plus an optional gater; `__call__` returns (logits, out).

  Attributes:
    backbone: a `backbone.Backbone`.
    gater: a `Gater` emitting `backbone.gate_spec().total` logits, or None
      (for the ungated baseline and for a backbone with local gates).
    mix_prob, noise_std: Improved SemHash's training-time settings.
    binarize: how SemHash's binary gates are cut from the gater's logits
      (`gates.BINARIZE_RULES`: 'paper', or 'official' for imported official
      checkpoints).
    compaction: a compacted model's constant gates (models/compaction.py;
      its backbone carries the same): the gater still emits every gate's
      logit, passes the input-dependent gates on and counts the constant
      ones that leave their pattern.
  """

  backbone: nn.Module
  gater: Optional[nn.Module] = None
  mix_prob: float = 0.5
  noise_std: float = 1.0
  binarize: str = 'paper'
  compaction: Optional[Compaction] = None

  @property
  def gating(self) -> str:
    """The model's gating method (`gaternet_jax.gating`): 'gater' with a
    gater, 'local' for batch-shaping's self-gating backbones, else 'none'."""
    if self.gater is not None:
      return gating_lib.GATER
    if self.backbone.local_gating is not None:
      return gating_lib.LOCAL
    return gating_lib.NONE

  def gate_spec(self) -> GateSpec:
    if self.gating == gating_lib.NONE:
      return GateSpec()
    return self.backbone.gate_spec()

  def __call__(
      self,
      images: jax.Array,
      *,
      train: bool = False,
      gate_dropout: jax.Array | float = 0.0,
  ) -> Tuple[jax.Array, Dict[str, Any]]:
    """`(batch, h, w, c)` -> (`(batch, classes)` logits, out).

    `out` holds what the losses, statistics and analysis read:
      'gates':       the gate PyTree `{site: (batch, filters)}` ({} for the
                     baseline); a gater's G(x) before scheduled dropout
                     (what the L1 term and the gate statistics are about;
                     the backbone runs on the dropped ones);
      'gate_values': local gates' relaxed values, a gate PyTree (the
                     batch-shaping loss's input);
      'gate_probs':  local gates' on-probabilities, a gate PyTree (L0's);
      'aux_logits':  an auxiliary classifier's logits, in training;
      'unseen_gates': a compacted model's `(batch,)` count of constant
                     gates that left their calibration pattern.

    In training the rng stream 'gates' drives SemHash's noise and mixing
    (or the Gumbel noise of local gates) and, when `gate_dropout` > 0 (the
    scheduled dropout of Appendix B), the dropout of gates.
    """
    if self.gating == gating_lib.LOCAL:
      logits, extras = self.backbone(images, None, train=train)
      samples = extras.pop(GATE_SAMPLES, {})
      return logits, dict(
          extras,
          gates={k: v['gate'] for k, v in samples.items()},
          gate_values={k: v['value'] for k, v in samples.items()},
          gate_probs={k: v['prob'] for k, v in samples.items()},
      )
    if self.gating == gating_lib.NONE:
      logits, extras = self.backbone(images, None, train=train)
      return logits, dict(extras, gates={})
    spec = self.backbone.gate_spec()
    full = spec if self.compaction is None else self.compaction.full_spec()
    gate_logits = self.gater(images, train=train)
    assert gate_logits.shape[-1] == full.total, (gate_logits.shape, full.total)
    rng = self.make_rng('gates') if train else None
    flat = improved_semhash(
        gate_logits,
        rng=rng,
        train=train,
        mix_prob=self.mix_prob,
        noise_std=self.noise_std,
        rule=self.binarize,
    )
    unseen = None
    if self.compaction is not None:
      unseen = self.compaction.unseen(flat)
      flat = flat[:, self.compaction.flat_indices()[0]]
    gates = spec.unflatten(flat)
    used = gates
    if (
        train
        and spec
        and not (isinstance(gate_dropout, (int, float)) and gate_dropout == 0)
    ):
      used = drop_gates(gates, spec, gate_dropout, self.make_rng('gates'))
    logits, extras = self.backbone(images, used, train=train)
    if unseen is not None:
      extras[UNSEEN_GATES] = unseen
    return logits, dict(extras, gates=gates)
