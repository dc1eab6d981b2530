"""The embedded demo: GaterNet on scikit-learn's 8x8 digits, no download.

A ResNet-8 backbone gated by a ResNet-8 gater; one baseline run pretrains
both (section 3.3), then the two train jointly. Runs in a few minutes on a
laptop CPU.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = base.base_config()
  c.data.name = 'digits'
  c.data.source = 'builtin'
  c.data.mean = None  # computed from the training images
  c.data.std = None
  c.data.crop_padding = 1
  c.data.flip = False  # digits are not mirror-symmetric

  arch = dict(name='cifar_resnet', depth=8, widths=(16, 32, 64))
  c.model.backbone = ml_collections.ConfigDict(dict(arch, se_reduction=0))
  c.model.gater = ml_collections.ConfigDict(
      dict(arch, bottleneck=8, batchnorm=True)
  )

  c.batch_size = 64
  c.eval_batch_size = 200
  c.num_epochs = 30
  c.optimizer.learning_rate = 0.05
  c.optimizer.lr_boundaries = (20, 26)
  c.weight_decay = 5e-4
  c.gate_l1_weight = 0.1
  c.pretrain.overrides = ml_collections.ConfigDict(dict(num_epochs=30))

  c.log_every_steps = 50
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 200
  c.progress_every_secs = 10.0
  return c
