"""CIFAR-10 DenseNet-BC (Huang et al.) of GaterNet's Table 2.

Training scheme of the DenseNet paper: SGD with Nesterov momentum 0.9,
batch 64, 300 epochs, lr 0.1 divided by 10 at 50% and 75% of training,
weight decay 1e-4. GaterNet's joint training (sec. 4.4) adds 20 epochs,
starts at lr 0.05 and uses scheduled dropout on the gates (Appendix B).
"""

import ml_collections

from configs import base

SIZES = {'bc100_k12': (100, 12), 'bc250_k24': (250, 24), 'bc190_k40': (190, 40)}


def densenet_config(size: str, gated: bool = True) -> ml_collections.ConfigDict:
  depth, k = SIZES[size]
  c = base.base_config()
  c.data.update(base.CIFAR_AUGMENTATION)
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='densenet_bc', depth=depth, growth_rate=k)
  )
  c.model.gating = 'gater' if gated else 'none'
  c.batch_size = 64
  c.optimizer.nesterov = True
  epochs, lr = (320, 0.05) if gated else (300, 0.1)
  c.num_epochs = epochs
  c.optimizer.learning_rate = lr
  c.optimizer.lr_boundaries = (epochs // 2, epochs * 3 // 4)
  c.model.gate_dropout = 0.05 if gated else 0.0
  # The backbone's pretraining run follows the baseline scheme (the ResNet-20
  # gater's follows He et al.'s: pretrain.gater_overrides, configs/base.py).
  c.pretrain.overrides = ml_collections.ConfigDict(
      dict(
          num_epochs=300,
          optimizer=dict(learning_rate=0.1, lr_boundaries=(150, 225)),
      )
  )
  return c
