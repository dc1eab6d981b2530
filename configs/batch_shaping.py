"""Batch-shaped channel-gated ResNets (Bejnordi, Welling, Blankevoort, 2020).

Every residual unit gates its own inner channels: a gating module reads the
unit's input (global pool -> FC 16 -> BN -> ReLU -> FC), samples binary
gates with a straight-through Gumbel-sigmoid (temperature 2/3) and switches
off channels of the unit's first conv (basic blocks) or between its convs
(bottlenecks). The batch-shaping loss pulls each gate's distribution over
the batch towards a Beta(0.6, 0.4) prior; the `_l0` variants then add the L0
loss (the expected fraction of open gates) after the batch-shaping phase.

The paper's abstract gives no schedule, so these are our defaults, all of
them config fields: batch-shaping weight 0.75 for the first fifth of
training, falling linearly to 0 by two fifths; L0 weight 0.05 switched on at
two fifths and ramped in over a tenth of training (lambda sets the
accuracy/MAC trade-off). The CIFAR runs use the long schedule the paper's
CIFAR experiments are known for (500 epochs, batch 256, Nesterov, weight
decay 5e-4); ImageNet uses the torchvision ResNet scheme of configs/imagenet.py.
No pretraining stage: the gated networks train from scratch.
"""

import ml_collections

from configs import base
from configs import imagenet

CIFAR_DEPTHS = (20, 32, 56)
IMAGENET_DEPTHS = (18, 34, 50)


def set_gate_losses(c: ml_collections.ConfigDict, l0: bool, epochs: float):
  """Turns `c` into a self-gated run with batch-shaping (and L0) losses,
  with the base config's gating modules (`model.local_gating`)."""
  c.model.gating = 'local'  # no GaterNet gater: the units gate themselves
  c.gate_l1_weight = 0.0
  c.pretrain.enabled = False
  c.batch_shaping.update(
      dict(
          weight=0.75,
          a=0.6,
          b=0.4,
          final_weight=0.0,
          decay_start_epoch=0.2 * epochs,
          decay_end_epoch=0.4 * epochs,
      )
  )
  c.l0.update(
      dict(
          weight=0.05 if l0 else 0.0,
          start_epoch=0.4 * epochs,
          ramp_epochs=0.1 * epochs,
      )
  )


def cifar_config(depth: int, l0: bool = False) -> ml_collections.ConfigDict:
  """CIFAR-10 ResNet-`depth` (20, 32, 56), batch-shaped, optionally L0."""
  assert depth in CIFAR_DEPTHS, depth
  c = base.base_config()
  c.data.update(base.CIFAR_AUGMENTATION)
  c.data.name = 'cifar10'
  c.model.backbone = ml_collections.ConfigDict(
      dict(
          name='cifar_resnet', depth=depth, widths=(16, 32, 64), se_reduction=0
      )
  )
  c.batch_size = 256
  c.num_epochs = 500
  c.optimizer.update(
      dict(
          learning_rate=0.1,
          nesterov=True,
          lr_boundaries=(250, 375),
          lr_decay=0.1,
      )
  )
  c.weight_decay = 5e-4
  set_gate_losses(c, l0, c.num_epochs)
  return c


def imagenet_config(depth: int, l0: bool = False) -> ml_collections.ConfigDict:
  """ImageNet ResNet-`depth` (18, 34, 50), batch-shaped, optionally L0.

  Bottlenecks (ResNet-50) gate the channels between the 1x1 and the 3x3
  conv (`model.local_gating.position='conv1'`; 'conv2' gates after the 3x3).
  """
  assert depth in IMAGENET_DEPTHS, depth
  c = imagenet.resnet_config(depth, 'baseline')
  set_gate_losses(c, l0, c.num_epochs)
  return c
