"""ImageNet Inception-v4-Gated (ResNet-18 gater): GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.inception_config(gated=True)
