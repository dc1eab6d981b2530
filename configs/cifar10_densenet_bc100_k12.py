"""CIFAR-10 DenseNet-BC (L=100, k=12)-Gated (ResNet-20 gater): GaterNet Table 2."""

from configs import densenet


def get_config():
  return densenet.densenet_config('bc100_k12', gated=True)
