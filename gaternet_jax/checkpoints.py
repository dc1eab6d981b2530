"""Checkpoints with Orbax's CheckpointManager, and initialisation from them.

A run's checkpoints live in `<workdir>/checkpoints`; the latest one is
restored automatically, so a killed run restarted with the same command
continues where it stopped. Pretrained weights (GaterNet section 3.3) are
read from other workdirs' checkpoints and copied into a new state.
"""

from __future__ import annotations

import shutil
from typing import Any, Mapping, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from gaternet_jax import paths
from gaternet_jax.errors import WorkdirError


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints` (absolute if local; a gs:// URI stays one)."""
  return paths.join(workdir, 'checkpoints')


class Checkpointer:
  """Saves and restores a train state (as its flax state dict)."""

  def __init__(
      self,
      workdir: str,
      *,
      max_to_keep: int = 3,
      save_every_steps: int = 1000,
      read_only: bool = False,
  ):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=max(save_every_steps, 1),
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(
      self,
      step: int,
      state: Any,
      force: bool = False,
      train_seconds: Optional[float] = None,
      metadata: Optional[Mapping[str, Any]] = None,
  ) -> bool:
    """Saves `state` at `step` if the interval says so (or `force`), with
    the training time so far (`train_seconds`) and `metadata` (JSON) in
    the step's metadata."""
    custom = dict(metadata or {})
    if train_seconds is not None:
      custom['train_seconds'] = float(train_seconds)
    if force or self._manager.should_save(int(step)):
      self._check_free_space(state)
    return self._manager.save(
        int(step),
        args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        force=force,
        custom_metadata=custom or None,
    )

  def _check_free_space(self, state: Any):
    """Refuses to start a checkpoint the local disk has no room for: a
    save that fails half-way leaves Orbax's threads failing one by one.
    (The save before it is finished first, as Orbax's save would.)"""
    if paths.is_remote(self.directory):
      return
    self._manager.wait_until_finished()
    need = sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x in jax.tree_util.tree_leaves(state)
        if hasattr(x, 'dtype')
    )
    need = int(need * 1.1) + (256 << 10)  # metadata, the format's files
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise WorkdirError(
          f'The disk of {self.directory} has {free / 2**20:.2f} MiB free and '
          f'a checkpoint needs about {need / 2**20:.2f} MiB; free some space '
          f'and run the same command again to resume from step '
          f'{self.latest_step()}.'
      )

  def custom_metadata(self, step: Optional[int] = None) -> Mapping[str, Any]:
    """The metadata `save` stored with the checkpoint at `step` (default:
    the latest); {} if none."""
    step = self.latest_step() if step is None else step
    if step is None:
      return {}
    return self._manager.metadata(step).custom_metadata or {}

  def train_seconds(self, step: Optional[int] = None) -> float:
    """Training time recorded with the checkpoint at `step` (0 if none)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return 0.0
    custom = self._manager.metadata(step).custom_metadata or {}
    return float(custom.get('train_seconds', 0.0))

  def restore(self, state: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, dtypes and shardings of `state`."""
    step = self.latest_step() if step is None else step
    target = flax.serialization.to_state_dict(state)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, 'sharding', None)
        ),
        target,
    )
    try:
      restored = self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract)
      )
    except (ValueError, KeyError, TypeError) as e:
      raise WorkdirError(
          f'The checkpoint at step {step} in {self.directory} does not match '
          f"this config's model ({type(e).__name__}); use a new --workdir or "
          f'the config that wrote it.'
      ) from e
    return flax.serialization.from_state_dict(state, restored)

  def restore_raw(self, step: Optional[int] = None) -> Mapping[str, Any]:
    """The checkpoint at `step` (default: the latest) as nested dicts of
    numpy arrays, whatever devices wrote it (a pod slice's checkpoint
    loads on one CPU): every array is read onto this process's first
    device."""
    step = self.latest_step() if step is None else step
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self._manager.item_metadata(step)
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        getattr(metadata, 'tree', metadata),
    )
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract)
    )
    return jax.tree_util.tree_map(np.asarray, restored)

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds at least one finished checkpoint."""
  if not paths.resolve(checkpoint_dir(workdir)).is_dir():
    return False
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def train_seconds(workdir: str) -> float:
  """Training time recorded with `workdir`'s latest checkpoint (0 if none)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.train_seconds()
  finally:
    ckpt.close()


def load_variables(workdir: str) -> Mapping[str, Any]:
  """{'params', 'batch_stats', 'step'} of the latest checkpoint in `workdir`."""
  if not paths.resolve(checkpoint_dir(workdir)).is_dir():
    raise WorkdirError(
        f'No checkpoints in {workdir!r} (expected '
        f'{checkpoint_dir(workdir)}); train that run first.'
    )
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    if ckpt.latest_step() is None:
      raise WorkdirError(f'No checkpoint found in {checkpoint_dir(workdir)}.')
    raw = ckpt.restore_raw()
  finally:
    ckpt.close()
  return {
      'params': raw['params'],
      'batch_stats': raw.get('batch_stats', {}),
      'step': int(np.asarray(raw['step'])),
  }


def graft(tree: Mapping[str, Any], path: tuple, subtree: Any, what: str):
  """Returns `tree` with `tree[path...]` replaced by `subtree` (same shapes)."""
  tree = flax.core.unfreeze(tree)
  node = tree
  for key in path[:-1]:
    node = node[key]
  old = node[path[-1]]
  old_struct = jax.tree_util.tree_structure(old)
  new_struct = jax.tree_util.tree_structure(subtree)
  if old_struct != new_struct:
    want = set(flax.traverse_util.flatten_dict(old, sep='/'))
    have = set(flax.traverse_util.flatten_dict(subtree, sep='/'))
    missing, extra = sorted(want - have), sorted(have - want)
    where = (
        f'it lacks {missing[0]}'
        + (f' and {len(missing) - 1} more' if len(missing) > 1 else '')
        if missing
        else f'it has {extra[0]}, which this model lacks'
    )
    raise WorkdirError(
        f"The pretrained {what} does not have this model's layers ({where});"
        f' check that its config matches.'
    )
  for (p, a), b in zip(
      jax.tree_util.tree_leaves_with_path(old),
      jax.tree_util.tree_leaves(subtree),
  ):
    if tuple(a.shape) != tuple(np.shape(b)):
      raise WorkdirError(
          f'The pretrained {what} has shape {np.shape(b)} at '
          f'{jax.tree_util.keystr(p)} where this model has {a.shape}; check '
          f'that its config matches.'
      )
  node[path[-1]] = jax.tree_util.tree_map(
      lambda a, b: np.asarray(b, dtype=a.dtype), old, subtree
  )
  return tree
