"""ImageNet ResNet-50 with batch-shaped channel gating."""

from configs import batch_shaping


def get_config():
  return batch_shaping.imagenet_config(50, l0=False)
