"""ImageNet Inception-v4 baseline: GaterNet Table 3."""

from configs import imagenet


def get_config():
  return imagenet.inception_config(gated=False)
