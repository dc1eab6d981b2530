"""CIFAR10 ResNet-164-Gated (ResNet-20 gater): GaterNet Table 1."""

from configs import cifar


def get_config():
  return cifar.cifar_config('cifar10', 'r164', 'gated')
