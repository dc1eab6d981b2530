"""ImageNet ResNet-101-SE: GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(101, 'se')
