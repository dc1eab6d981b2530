"""CIFAR-10 DenseNet-BC (L=190, k=40)-Gated (ResNet-20 gater): GaterNet Table 2."""

from configs import densenet


def get_config():
  return densenet.densenet_config('bc190_k40', gated=True)
