"""Gated ResNet-34 on synthetic ImageNet-sized data: a benchmark without a
dataset.

  python main.py --config=configs/imagenet_fake_r34.py --mode=benchmark

--mode=benchmark measures it gated and ungated in one process, at the
config's batch of 256 unless --config.benchmark.batch_size says otherwise
(8 fits a 24 GiB CPU host).
"""

from configs import imagenet


def get_config():
  return imagenet.fake_config('r34')
