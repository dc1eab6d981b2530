"""CIFAR-10 Shake-Shake 26 2x64d baseline: GaterNet Table 2."""

from configs import shakeshake


def get_config():
  return shakeshake.shakeshake_config('2x64d', gated=False)
