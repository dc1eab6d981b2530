"""CIFAR-10/100 ResNets of GaterNet's Table 1: gated, baseline, wider, SE.

Widths of ResNet-Wider are chosen so its parameters match the gated model's
(as the paper does); SE reductions so the SE baselines' parameters match the
paper's (4 for ResNet-20/56, 8 for ResNet-164).
"""

import ml_collections

from configs import base

ARCHS = {
    'r20': dict(name='cifar_resnet', depth=20, widths=(16, 32, 64)),
    'r56': dict(name='cifar_resnet', depth=56, widths=(16, 32, 64)),
    'r164': dict(
        name='cifar_preact_resnet',
        depth=164,
        widths=((4, 16), (32, 128), (64, 256)),
    ),
}
WIDER = {
    'r20': dict(widths=(23, 46, 92)),
    'r56': dict(widths=(18, 36, 72)),
    'r164': dict(widths=((4, 18), (36, 144), (72, 288))),
}
SE_REDUCTION = {'r20': 4, 'r56': 4, 'r164': 8}
VARIANTS = ('gated', 'baseline', 'wider', 'se')


def cifar_config(
    dataset: str, arch: str, variant: str = 'gated'
) -> ml_collections.ConfigDict:
  """`dataset` cifar10|cifar100, `arch` r20|r56|r164, `variant` in VARIANTS."""
  assert variant in VARIANTS, variant
  c = base.base_config()
  c.data.update(base.CIFAR_AUGMENTATION)
  c.data.name = dataset
  if dataset == 'cifar100':
    c.data.mean = (0.5071, 0.4865, 0.4409)
    c.data.std = (0.2673, 0.2564, 0.2762)
  backbone = dict(ARCHS[arch], se_reduction=0)
  if variant == 'wider':
    backbone.update(WIDER[arch])
  if variant == 'se':
    backbone['se_reduction'] = SE_REDUCTION[arch]
  c.model.backbone = ml_collections.ConfigDict(backbone)
  c.model.gating = 'gater' if variant == 'gated' else 'none'
  if arch == 'r164':
    # He et al. (identity mappings) train ResNet-164 at lr 0.01 for its
    # first ~400 iterations (one epoch at batch 128), then at 0.1.
    c.optimizer.warmup_epochs = 1.0
    c.optimizer.warmup_lr = 0.01
  return c
