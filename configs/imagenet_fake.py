"""ImageNet models on synthetic data: benchmarks without a dataset.

  python main.py --config=configs/imagenet_fake.py:r101 --mode=benchmark

The variant after ':' is r18|r34|r50|r101|r152|inception_v4 (default r50);
--mode=benchmark measures it gated and ungated in one process, at the
config's batch of 256 unless --config.benchmark.batch_size says otherwise
(8 fits a 24 GiB CPU host).
"""

from configs import imagenet


def get_config(variant: str = 'r50'):
  if variant == 'inception_v4':
    c = imagenet.inception_config(gated=True)
  elif variant.startswith('r') and variant[1:].isdigit():
    c = imagenet.resnet_config(int(variant[1:]), 'gated')
  else:
    raise ValueError(f'imagenet_fake variant must be r18|r34|r50|r101|r152|'
                     f'inception_v4; got {variant!r}.')
  c.data.name = 'fake'
  c.pretrain.enabled = False
  c.num_epochs = 1
  c.eval_every_epochs = 1.0
  c.data.num_train_examples = 10_000
  c.data.num_test_examples = 1_000
  return c
