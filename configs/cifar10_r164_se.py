"""CIFAR10 ResNet-164-SE: GaterNet Table 1."""

from configs import cifar


def get_config():
  return cifar.cifar_config('cifar10', 'r164', 'se')
