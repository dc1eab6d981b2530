"""CIFAR-10 ResNet-20 with batch-shaped channel gating and the L0 loss."""

from configs import batch_shaping


def get_config():
  return batch_shaping.cifar_config(20, l0=True)
