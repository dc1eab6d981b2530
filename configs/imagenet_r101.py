"""ImageNet ResNet-101-Gated (ResNet-18 gater, bottleneck 256): GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(101, 'gated')
