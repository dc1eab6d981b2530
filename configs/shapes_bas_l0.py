"""The synthetic segmentation demo: batch-shaped channel-gated ResNet-18
DeepLabv3 on 64x64 shapes, with the L0 loss after the batch-shaping
phase (configs/segmentation.py).
"""

from configs import segmentation


def get_config():
  return segmentation.shapes_config(l0=True)
