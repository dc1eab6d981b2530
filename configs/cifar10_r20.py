"""CIFAR10 ResNet-20-Gated (ResNet-20 gater): GaterNet Table 1."""

from configs import cifar


def get_config():
  return cifar.cifar_config('cifar10', 'r20', 'gated')
