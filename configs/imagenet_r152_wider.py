"""ImageNet ResNet-152-Wider: GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(152, 'wider')
