"""Channel-gated semantic segmentation (batch-shaping's third experiment).

A gated ResNet encoder with dilated last stages (output stride 8) under a
DeepLabv3 ASPP head whose branches are gated too, trained with per-pixel
cross-entropy (label 255 ignored), the batch-shaping loss and optionally L0
(configs/batch_shaping.py's schedule: weight 0.75 for the first fifth of
training, falling to 0 by two fifths; L0 0.05 from two fifths on).

The batch-shaping paper's abstract names Cityscapes but gives no setting;
for Cityscapes these follow the common DeepLabv3 recipe for ResNet-50
(mmsegmentation's 80k schedule): 512x1024 crops of the full 1024x2048
frames rescaled by 0.5-2.0 and flipped, batch 8, SGD 0.01 with momentum 0.9
and the poly schedule (power 0.9), weight decay 5e-4, ASPP rates 12/24/36
at output stride 8; the encoder is the ImageNet ResNet-50 with batch-
shaping's gates between its 1x1 and 3x3 convs. Without an ImageNet-trained
encoder (none ships with this repository) it trains from scratch, which
costs mIoU.

`shapes_config` is the digits-sized demo on the synthetic shapes dataset
(gaternet_jax/shapes.py): 64x64 images, a narrow ResNet-18 encoder at
output stride 8 (stages 3 and 4 dilated), ASPP with rates 2/3/4.
"""

import ml_collections

from configs import base
from configs import batch_shaping


def _segmentation(c, output_stride, rates, head_width):
  c.model.segmentation.update(
      dict(
          enabled=True,
          output_stride=output_stride,
          head='aspp',
          head_width=head_width,
          aspp_rates=rates,
          dropout=0.1,
          gate_head=True,
      )
  )
  c.data.ignore_label = 255
  c.label_smoothing = 0.0


def cityscapes_config(l0: bool) -> ml_collections.ConfigDict:
  """Cityscapes, gated ResNet-50 DeepLabv3 at output stride 8."""
  c = base.base_config()
  c.data.name = 'cityscapes'
  c.data.source = 'folder'  # or 'tfds' (cityscapes/semantic_segmentation)
  c.data.data_dir = ''  # set --config.data.data_dir
  c.data.image_size = 0  # the native 1024x2048 frames
  c.data.crop_size = (512, 1024)
  c.data.scale_range = (0.5, 2.0)
  c.data.flip = True
  c.data.mean = (0.485, 0.456, 0.406)  # ImageNet's, as the encoder's
  c.data.std = (0.229, 0.224, 0.225)
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='imagenet_resnet', depth=50, widths=(64, 128, 256, 512))
  )
  c.model.local_gating.position = 'conv1'
  _segmentation(c, 8, (12, 24, 36), 256)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_train_steps = 80_000
  c.optimizer.update(
      dict(
          learning_rate=0.01,
          momentum=0.9,
          nesterov=False,
          schedule='poly',
          poly_power=0.9,
      )
  )
  c.weight_decay = 5e-4
  # The gate losses' schedule in epochs of the 2,975 train frames.
  epochs = c.num_train_steps * c.batch_size / 2975
  batch_shaping.set_gate_losses(c, l0=l0, epochs=epochs)
  c.log_every_steps = 50
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 2000
  c.analysis.tsne_samples = 500
  return c


def shapes_config(l0: bool) -> ml_collections.ConfigDict:
  """The synthetic shapes demo: a few minutes on a laptop CPU."""
  c = base.base_config()
  c.data.name = 'shapes'
  c.data.source = 'builtin'
  c.data.image_size = 64
  c.data.num_train_examples = 2000
  c.data.num_test_examples = 500
  c.data.mean = None  # computed from the training images
  c.data.std = None
  c.data.crop_size = None  # the whole (rescaled) image
  c.data.scale_range = (0.8, 1.25)
  c.data.flip = True
  c.model.backbone = ml_collections.ConfigDict(
      dict(
          name='imagenet_resnet',
          depth=18,
          widths=(16, 32, 64, 128),
          se_reduction=0,
      )
  )
  _segmentation(c, 8, (2, 3, 4), 32)
  c.batch_size = 32
  c.eval_batch_size = 250
  c.num_epochs = 12
  c.optimizer.update(
      dict(
          learning_rate=0.1,
          momentum=0.9,
          nesterov=True,
          schedule='poly',
          poly_power=0.9,
          warmup_epochs=0.5,
      )
  )
  c.weight_decay = 1e-4
  batch_shaping.set_gate_losses(c, l0=l0, epochs=c.num_epochs)
  c.log_every_steps = 50
  c.eval_every_epochs = 4.0
  c.checkpoint_every_steps = 250
  c.progress_every_secs = 10.0
  c.analysis.tsne_samples = 500
  return c
