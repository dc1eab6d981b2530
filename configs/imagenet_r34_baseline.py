"""ImageNet ResNet-34 baseline: GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(34, 'baseline')
