"""ImageNet ResNet-34 with batch-shaped channel gating."""

from configs import batch_shaping


def get_config():
  return batch_shaping.imagenet_config(34, l0=False)
