"""One setup path for every mode: the data, the model and its gate spec,
the device mesh, the MAC counter, and the jitted steps.

`setup(config)` is what train, eval, analyze and benchmark all start from;
each then makes its own train state (fresh, resumed or restored for
evaluation) and runs its loop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

from absl import logging
import jax
import ml_collections

from gaternet_jax import augment
from gaternet_jax import data as data_lib
from gaternet_jax import datasets
from gaternet_jax import macs as macs_lib
from gaternet_jax import segmentation
from gaternet_jax import sharding
from gaternet_jax import steps as steps_lib
from gaternet_jax.gates import GateSpec
from gaternet_jax.models import create_model


@dataclasses.dataclass
class Experiment:
  """What a config builds before any state exists.

  Attributes:
    config: the experiment config.
    ds: the dataset (None when set up without data, as the benchmark is).
    model: the model of `config.model` (its `gating` says the method).
    spec: the model's gate spec (empty for a baseline).
    mesh: the device mesh.
    mac_counter: the model's MAC counter, or None where its backbone cannot
      say which convs its gates switch off.
    image_shape, num_classes: of the dataset.
    mean, std: per-channel normalisation of the images.
    augmentation: what the train step adds to each batch: the dataset's
      own (`Dataset.augmentation`).
    task: the segmentation task (segmentation.py), or None for a
      classifier.
  """

  config: ml_collections.ConfigDict
  ds: Optional[datasets.Dataset]
  model: Any
  spec: GateSpec
  mesh: Any
  mac_counter: Optional[macs_lib.MacCounter]
  image_shape: Tuple[int, ...]
  num_classes: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  augmentation: augment.Augmentation | augment.SegmentationAugmentation
  task: Optional[segmentation.Segmentation] = None

  def new_state(self, lr_fn, rng: jax.Array) -> steps_lib.TrainState:
    """Freshly initialised parameters and optimiser state, replicated."""
    return steps_lib.create_train_state(
        self.config, self.model, self.image_shape, lr_fn, rng, self.mesh
    )

  def steps(
      self, num_train_steps: int = 1, steps_per_epoch: int = 1
  ) -> steps_lib.Steps:
    """The jitted train and eval steps of this model on this mesh."""
    return steps_lib.Steps(
        self.config,
        self.spec,
        self.mesh,
        self.mean,
        self.std,
        num_train_steps,
        steps_per_epoch,
        self.mac_counter,
        augmentation=self.augmentation,
        task=self.task,
    )


def num_steps(config, ds):
  """(steps_per_epoch, num_train_steps) of a config on a dataset.

  Steps per epoch are the dataset's own (`ds.steps_per_epoch`): a streamed
  dataset sharded over processes counts full batches of its smallest shard,
  so the trainer's epoch boundaries (schedules, evals) are the pipeline's.
  """
  steps_per_epoch = ds.steps_per_epoch(config.batch_size)
  total = config.num_train_steps
  if total is None or total <= 0:
    total = int(round(config.num_epochs * steps_per_epoch))
  return steps_per_epoch, total


def create_mac_counter(
    model: Any, image_shape
) -> Optional[macs_lib.MacCounter]:
  """The model's MAC counter, or None (logged) if its backbone cannot say
  which convs its gates switch off."""
  try:
    return macs_lib.count(model, image_shape)
  except NotImplementedError as e:
    logging.warning('No MAC accounting: %s', e)
    return None


def setup(
    config: ml_collections.ConfigDict,
    dataset: Optional[datasets.Dataset] = None,
    load_data: bool = True,
    count_macs: bool = True,
) -> Experiment:
  """Builds `config`'s data, model, gate spec, mesh and MAC counter.

  Args:
    config: the experiment config.
    dataset: an already loaded dataset (else `config.data` is loaded).
    load_data: False sets up from the dataset's shape and classes alone
      (`ds` is then None, the images are normalised with 0.5 / 0.25 and
      augmented as the dataset would be, `data.train_augmentation`): what
      a benchmark on synthetic batches needs.
    count_macs: False skips the MAC counter (`mac_counter` is then None and
      the eval step counts no MACs).
  """
  if dataset is not None or load_data:
    ds = dataset if dataset is not None else data_lib.load_dataset(config.data)
    image_shape, num_classes = tuple(ds.image_shape), ds.num_classes
    mean, std = tuple(ds.mean), tuple(ds.std)
    augmentation = ds.augmentation
  else:
    ds = None
    image_shape, num_classes = data_lib.dataset_info(config.data)
    image_shape = tuple(image_shape)
    mean, std = (0.5,) * image_shape[-1], (0.25,) * image_shape[-1]
    augmentation = data_lib.train_augmentation(config.data)
  model = create_model(config.model, num_classes)
  return Experiment(
      config=config,
      ds=ds,
      model=model,
      spec=model.gate_spec(),
      mesh=sharding.create_mesh(),
      mac_counter=(
          create_mac_counter(model, image_shape) if count_macs else None
      ),
      image_shape=image_shape,
      num_classes=num_classes,
      mean=mean,
      std=std,
      augmentation=augmentation,
      task=segmentation.Segmentation.from_config(config, num_classes),
  )
