"""The digits demo with batch-shaping's channel-gated ResNet-8 and the L0
loss after the batch-shaping phase, trading accuracy for fewer MACs (the
`configs/digits_bas.py` run plus L0).
"""

import ml_collections

from configs import digits_bas


def get_config() -> ml_collections.ConfigDict:
  return digits_bas.bas_config(l0=True)
