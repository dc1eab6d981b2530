"""The digits demo with batch-shaping's channel-gated ResNet-8.

`--config=configs/digits_bas.py` trains with the batch-shaping loss only;
`--config=configs/digits_bas.py:l0` adds the L0 loss after the batch-shaping
phase, trading accuracy for fewer MACs. Same data, backbone and schedule as
configs/default.py, so the runs compare directly with its baseline and
GaterNet results.
"""

import ml_collections

from configs import batch_shaping
from configs import default


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant not in ('', 'l0'):
    raise ValueError(f"configs/digits_bas.py takes '' or ':l0'; got "
                     f'{variant!r}.')
  c = default.get_config()
  batch_shaping.set_gate_losses(c, l0=variant == 'l0',
                                epochs=c.num_epochs)
  return c
