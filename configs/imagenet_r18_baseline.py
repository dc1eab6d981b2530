"""ImageNet ResNet-18 baseline: the gater of Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(18, 'baseline')
