"""Gated ResNet-50 on synthetic ImageNet-sized data: a benchmark without a
dataset, as configs/imagenet_fake_r50.py.

  python main.py --config=configs/imagenet_fake.py --mode=benchmark

The other models have a file each: configs/imagenet_fake_<model>.py for r18,
r34, r50, r101, r152 and inception_v4.
"""

from typing import Optional

import ml_collections

from configs import imagenet


def get_config(variant: Optional[str] = None) -> ml_collections.ConfigDict:
  # `variant` only turns the retired `imagenet_fake.py:<model>` form into
  # one sentence that names the file to use instead.
  if variant is not None:
    use = (
        f'configs/imagenet_fake_{variant}.py'
        if variant in imagenet.FAKE_MODELS
        else 'configs/imagenet_fake_<model>.py, <model> one of '
        + ', '.join(imagenet.FAKE_MODELS)
    )
    raise ValueError(
        f'configs/imagenet_fake.py has no variants; use ' f'{use}.'
    )
  return imagenet.fake_config('r50')
