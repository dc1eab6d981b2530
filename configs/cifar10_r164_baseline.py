"""CIFAR10 ResNet-164 baseline: GaterNet Table 1."""

from configs import cifar


def get_config():
  return cifar.cifar_config('cifar10', 'r164', 'baseline')
