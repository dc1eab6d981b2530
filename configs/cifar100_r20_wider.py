"""CIFAR100 ResNet-20-Wider: GaterNet Table 1."""

from configs import cifar


def get_config():
  return cifar.cifar_config('cifar100', 'r20', 'wider')
