"""The fields every experiment has, with CIFAR ResNet defaults (He et al.).

Experiment files start from `base_config()` and set what differs; every
number of an experiment lives in its config.
"""

import ml_collections

from gaternet_jax import datasets

# He et al.'s CIFAR augmentation: pad 4, random 32x32 crop, random flip.
CIFAR_AUGMENTATION = dict(crop_padding=4, flip=True)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Every dataset's fields (gaternet_jax/datasets.py DATA_DEFAULTS says what
  # each means and its default); a config sets the values its dataset needs
  # and the loaders ignore the rest (gaternet_jax/data.py for in-memory
  # datasets, gaternet_jax/input_pipeline.py for streamed). The base is
  # CIFAR-10 from TFDS; its train step asks for no augmentation (the CIFAR
  # families set CIFAR_AUGMENTATION), and streamed datasets (ImageNet)
  # augment in tf.data and refuse crop_padding and flip.
  c.data = ml_collections.ConfigDict(datasets.DATA_DEFAULTS)
  c.data.name = 'cifar10'
  c.data.source = 'tfds'
  c.data.data_dir = ''  # TFDS's default data_dir
  # CIFAR-10's per-channel mean and std of the train images, in [0, 1] units.
  c.data.mean = (0.4914, 0.4822, 0.4465)
  c.data.std = (0.2470, 0.2435, 0.2616)

  c.model = ml_collections.ConfigDict()
  # The gating method (gaternet_jax/gating.py): 'gater' (GaterNet: the gater
  # below gates the whole backbone), 'local' (batch-shaping: each residual
  # unit gates itself, as `local_gating` says) or 'none' (the baseline).
  c.model.gating = 'gater'
  c.model.dtype = 'float32'
  c.model.backbone = ml_collections.ConfigDict(
      dict(name='cifar_resnet', depth=20, widths=(16, 32, 64), se_reduction=0)
  )
  # The gater: a backbone without its output layer, then FC1 -> bottleneck
  # -> BatchNorm (the paper; the official code has none) -> ReLU -> FC2.
  c.model.gater = ml_collections.ConfigDict(
      dict(
          name='cifar_resnet',
          depth=20,
          widths=(16, 32, 64),
          bottleneck=8,
          batchnorm=True,
      )
  )
  # Improved SemHash's training noise and mixing, and how its gates are
  # binarised: 'paper' is 1(logit > 0); 'official' is the official code's
  # saturating_sigmoid(logit) > 0.49999 (logit > about -3.3e-5), which
  # imported official checkpoints need to reproduce their gates exactly.
  c.model.semhash = ml_collections.ConfigDict(
      dict(mix_prob=0.5, noise_std=1.0, binarize='paper')
  )
  # Batch-shaping's gating modules, read when gating is 'local': the conv
  # whose outputs they gate ('conv1'; bottlenecks also 'conv2'), the hidden
  # units, the Gumbel-sigmoid temperature and the gate logits' initial bias
  # (models/layers.py LocalGating).
  c.model.local_gating = ml_collections.ConfigDict(
      dict(position='conv1', hidden=16, temperature=2.0 / 3.0, bias_init=0.0)
  )
  # Final rate of the scheduled dropout on the gates (Appendix B: 0.05 for
  # DenseNet, Shake-Shake and Inception-v4), rising linearly from 0.
  c.model.gate_dropout = 0.0
  # A compacted model (`--mode=compact` writes it; models/compaction.py):
  # per gated site a pattern of its gates, '1' always on (folded), '0'
  # always off (filters removed), '*' input-dependent. '' is the model as
  # built.
  c.model.compaction = ''
  # Semantic segmentation (models/segmentation.py; datasets 'shapes' and
  # 'cityscapes'): `enabled` makes the ResNet backbone an encoder of
  # `output_stride` (8 or 16: its last stages dilated) under a context
  # `head` ('aspp' or 'psp') of `head_width` filters per branch (ASPP's
  # dilation `aspp_rates`, PSP's pooling `psp_bins`), `dropout` before the
  # per-pixel classifier; with `gate_head` the head's branches are a gated
  # site of the same GateSpec.
  c.model.segmentation = ml_collections.ConfigDict(
      dict(
          enabled=False,
          output_stride=16,
          head='aspp',
          head_width=256,
          aspp_rates=(6, 12, 18),
          psp_bins=(1, 2, 3, 6),
          dropout=0.1,
          gate_head=True,
      )
  )

  # Training scheme of the CIFAR ResNets: SGD 0.9, lr 0.1 divided by 10
  # at epochs 80 and 120 of 160, batch 128, weight decay 1e-4.
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 160
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.steps_per_call = 1  # with data.on_device: steps per jitted call
  c.optimizer = ml_collections.ConfigDict(
      dict(
          name='sgd',
          learning_rate=0.1,
          momentum=0.9,
          nesterov=False,
          schedule='step',
          lr_boundaries=(80, 120),
          lr_decay=0.1,
          decay_epochs=2.0,
          warmup_epochs=0.0,
          warmup_lr=0.0,
          rmsprop_decay=0.9,
          rmsprop_eps=1.0,
          poly_power=0.9,
      )
  )
  # warmup_lr=0: the warm-up rises linearly to learning_rate; > 0: it holds
  # warmup_lr. schedule='poly' (DeepLab's, segmentation) decays as
  # (1 - t / T) ** poly_power.
  c.weight_decay = 1e-4
  c.gate_l1_weight = 0.1  # lambda of the gate L1 term (sec. 3.2.2)
  # Batch-shaping (Bejnordi et al. 2020), for models with local gates: the
  # Beta(a, b) prior the relaxed gates are shaped to, weight `weight` until
  # `decay_start_epoch`, then linearly to `final_weight` at
  # `decay_end_epoch`.
  c.batch_shaping = ml_collections.ConfigDict(
      dict(
          weight=0.0,
          a=0.6,
          b=0.4,
          final_weight=0.0,
          decay_start_epoch=0.0,
          decay_end_epoch=0.0,
      )
  )
  # L0: `weight` times the mean probability of a gate being on, off until
  # `start_epoch` and ramped linearly to `weight` over `ramp_epochs`.
  c.l0 = ml_collections.ConfigDict(
      dict(weight=0.0, start_epoch=0.0, ramp_epochs=0.0)
  )
  c.label_smoothing = 0.0
  c.aux_loss_weight = 0.0  # weight of auxiliary classifiers' loss, if any

  # Section 3.3: pretrain backbone and gater features, then train jointly.
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.enabled = True
  c.pretrain.backbone_workdir = ''  # '' trains it in <workdir>/pretrain/
  c.pretrain.gater_workdir = ''
  # Fields that differ in the pretraining runs (any top-level config field).
  c.pretrain.overrides = ml_collections.ConfigDict()
  # The gater's own pretraining run, when its network differs from the
  # backbone's, follows the training scheme of the gater's network (section
  # 4.2: each network is pretrained as its original paper trains it), not
  # the backbone's: set below to the CIFAR ResNet scheme, by
  # configs/imagenet.py to the torchvision ResNet one. Applied after
  # `overrides`.
  c.pretrain.gater_overrides = ml_collections.ConfigDict()

  c.init = ml_collections.ConfigDict()
  c.init.official_checkpoint = ''  # a torch.save file of the official code

  c.log_every_steps = 100
  c.eval_every_epochs = 10.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.progress_every_secs = 30.0
  c.tensorboard = True

  c.benchmark = ml_collections.ConfigDict(
      dict(warmup_steps=3, steps=20, batch_size=0)
  )  # 0: c.batch_size

  # --mode=compact (gaternet_jax/compact.py): the gates of a trained run on
  # the calibration `split` ('train' or 'test', in batches of `batch_size`,
  # 0: eval_batch_size) say which are always on, always off or
  # input-dependent; the smaller equivalent network is written to the new
  # workdir `output`, after checking that its logits equal the trained
  # model's within `tolerance` (relative) on every calibration image.
  # `unseen`: what a compacted model does with an image that would open an
  # always-off gate: 'report' (its filter is removed; --mode=eval counts
  # such images) or 'keep' (always-off filters stay, input-dependent).
  c.compact = ml_collections.ConfigDict(
      dict(
          output='',
          split='train',
          batch_size=0,
          unseen='report',
          tolerance=1e-5,
      )
  )

  # --mode=speed (gaternet_jax/speed.py): inference latency at batch 1 and
  # throughput at `batch_size` (0: eval_batch_size) of the dense backbone,
  # the masked (gated) model, the compacted one and dynamic execution, each
  # next to its MAC reduction. Without a trained workdir the gates are drawn
  # at random: per image at each of `densities` (dynamic execution), per
  # filter for the compacted model. Each timing is the median of `runs`
  # calls (the four networks take turns) after `warmup` calls. Dynamic
  # execution runs `num_buckets` static widths per gated site and gathers
  # each input's own filters up to `per_input_batch` inputs a batch (above
  # that, the batch's union).
  c.speed = ml_collections.ConfigDict(
      dict(
          densities=(0.9, 0.7, 0.5, 0.3),
          batch_size=0,
          runs=10,
          warmup=2,
          num_buckets=8,
          per_input_batch=8,
          seed=0,
      )
  )

  # --mode=analyze (gaternet_jax/analysis.py): the gates of a trained run on
  # `split` ('test' or 'train'), streamed in batches of `batch_size` (0:
  # eval_batch_size). t-SNE and the k-NN agreement use `tsne_samples` random
  # samples (0: skip them), drawn with `seed`; gate vectors are reduced to
  # `pca_dims` by PCA first. An input-dependent gate is 'frequent' when on
  # for between `frequent_low` and `frequent_high` of the samples.
  c.analysis = ml_collections.ConfigDict(
      dict(
          split='test',
          batch_size=0,
          tsne_samples=2000,
          pca_dims=400,
          tsne_perplexity=30.0,
          knn_k=10,
          seed=0,
          frequent_low=0.01,
          frequent_high=0.99,
          histogram_bins=50,
          difficulty_bins=10,
          dpi=150,
      )
  )
  c.pretrain.gater_overrides = ml_collections.ConfigDict(training_scheme(c))
  return c


def training_scheme(c: ml_collections.ConfigDict) -> dict:
  """The fields of `c` that make up a network's training scheme."""
  return dict(
      num_epochs=c.num_epochs,
      batch_size=c.batch_size,
      optimizer=c.optimizer.to_dict(),
      weight_decay=c.weight_decay,
      label_smoothing=c.label_smoothing,
      aux_loss_weight=c.aux_loss_weight,
  )
