"""ImageNet ResNet-18 with batch-shaped channel gating."""

from configs import batch_shaping


def get_config():
  return batch_shaping.imagenet_config(18, l0=False)
