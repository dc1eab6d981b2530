"""CIFAR-10 ResNet-56 with batch-shaped channel gating and the L0 loss."""

from configs import batch_shaping


def get_config():
  return batch_shaping.cifar_config(56, l0=True)
