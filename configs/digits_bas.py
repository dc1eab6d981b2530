"""The digits demo with batch-shaping's channel-gated ResNet-8.

`--config=configs/digits_bas.py` trains with the batch-shaping loss only;
configs/digits_bas_l0.py adds the L0 loss. Same data, backbone and schedule
as configs/default.py, so the runs compare directly with its baseline and
GaterNet results.
"""

from typing import Optional

import ml_collections

from configs import batch_shaping
from configs import default


def bas_config(l0: bool) -> ml_collections.ConfigDict:
  """configs/default.py with batch-shaping's gates and losses, plus the L0
  loss after the batch-shaping phase when `l0`."""
  c = default.get_config()
  batch_shaping.set_gate_losses(c, l0=l0, epochs=c.num_epochs)
  return c


def get_config(variant: Optional[str] = None) -> ml_collections.ConfigDict:
  # `variant` only turns the retired `digits_bas.py:l0` form into one
  # sentence that names the file to use instead.
  if variant is not None:
    raise ValueError(
        'configs/digits_bas.py has no variants; use '
        'configs/digits_bas_l0.py.'
    )
  return bas_config(l0=False)
