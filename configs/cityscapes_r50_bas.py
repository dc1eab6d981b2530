"""Cityscapes semantic segmentation: batch-shaped channel-gated ResNet-50
DeepLabv3 at output stride 8 (batch-shaping loss only) (configs/segmentation.py).
"""

from configs import segmentation


def get_config():
  return segmentation.cityscapes_config(l0=False)
