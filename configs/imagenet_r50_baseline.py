"""ImageNet ResNet-50 baseline: the batch-shaping experiments."""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(50, 'baseline')
