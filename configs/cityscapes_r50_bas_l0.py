"""Cityscapes semantic segmentation: batch-shaped channel-gated ResNet-50
DeepLabv3 at output stride 8, with the L0 loss after the batch-shaping
phase (configs/segmentation.py).
"""

from configs import segmentation


def get_config():
  return segmentation.cityscapes_config(l0=True)
