"""ImageNet ResNet-50-Gated (ResNet-18 gater, bottleneck 256): GaterNet on
the backbone of the batch-shaping experiments (imagenet_r50_bas*.py).

Not in GaterNet's Table 3, which gates ResNet-34, -101 and -152.
"""

from configs import imagenet


def get_config():
  return imagenet.resnet_config(50, 'gated')
