"""CIFAR-10 Shake-Shake 26 2x64d / 2x96d (Gastaldi) of GaterNet's Table 2.

Training scheme of the Shake-Shake paper: SGD momentum 0.9 (Nesterov),
batch 128, 1800 epochs, lr 0.2 with cosine annealing, weight decay 1e-4.
GaterNet's joint training (sec. 4.4) adds 30 epochs, starts at lr 0.05 and
uses scheduled dropout on the gates (Appendix B).
"""

import ml_collections

from configs import base

WIDTHS = {'2x64d': 64, '2x96d': 96}


def shakeshake_config(
    size: str, gated: bool = True
) -> ml_collections.ConfigDict:
  c = base.base_config()
  c.data.update(base.CIFAR_AUGMENTATION)
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='shake_shake', depth=26, width=WIDTHS[size])
  )
  c.model.gating = 'gater' if gated else 'none'
  c.batch_size = 128
  c.optimizer.nesterov = True
  c.optimizer.schedule = 'cosine'
  c.num_epochs, c.optimizer.learning_rate = (
      (1830, 0.05) if gated else (1800, 0.2)
  )
  c.model.gate_dropout = 0.05 if gated else 0.0
  # The backbone's pretraining run follows the baseline scheme (the ResNet-20
  # gater's follows He et al.'s: pretrain.gater_overrides, configs/base.py).
  c.pretrain.overrides = ml_collections.ConfigDict(
      dict(num_epochs=1800, optimizer=dict(learning_rate=0.2))
  )
  return c
