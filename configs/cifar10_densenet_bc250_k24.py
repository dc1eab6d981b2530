"""CIFAR-10 DenseNet-BC (L=250, k=24)-Gated (ResNet-20 gater): GaterNet Table 2."""

from configs import densenet


def get_config():
  return densenet.densenet_config('bc250_k24', gated=True)
