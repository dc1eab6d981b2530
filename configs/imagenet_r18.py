"""ImageNet ResNet-18-Gated (ResNet-18 gater, bottleneck 256): the gater of Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(18, 'gated')
