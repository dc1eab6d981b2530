"""CIFAR-10 ResNet-32 with batch-shaped channel gating."""

from configs import batch_shaping


def get_config():
  return batch_shaping.cifar_config(32, l0=False)
