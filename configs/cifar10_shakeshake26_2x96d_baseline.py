"""CIFAR-10 Shake-Shake 26 2x96d baseline: GaterNet Table 2."""

from configs import shakeshake


def get_config():
  return shakeshake.shakeshake_config('2x96d', gated=False)
