"""ImageNet ResNet-50-Gated (ResNet-18 gater, bottleneck 256): the batch-shaping experiments."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(50, 'gated')
