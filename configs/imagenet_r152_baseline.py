"""ImageNet ResNet-152 baseline: GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(152, 'baseline')
