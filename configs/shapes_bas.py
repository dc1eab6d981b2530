"""The synthetic segmentation demo: batch-shaped channel-gated ResNet-18
DeepLabv3 on 64x64 shapes (batch-shaping loss only) (configs/segmentation.py).
"""

from configs import segmentation


def get_config():
  return segmentation.shapes_config(l0=False)
