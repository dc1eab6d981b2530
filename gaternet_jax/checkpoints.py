"""Checkpoints with Orbax's CheckpointManager, and initialisation from them.

A run's checkpoints live in `<workdir>/checkpoints`; the latest intact one
is restored automatically, so a killed run restarted with the same command
continues where it stopped. Pretrained weights (GaterNet section 3.3) are
read from other workdirs' checkpoints and copied into a new state.

A damaged step (a truncated or garbled array file, garbled metadata, an
empty step folder) is detected when it is read: each step records a
checksum of every array with its training time, so garbled bytes that
still decompress are caught too. Restoring then warns, naming the step and
the reason, and falls back to the newest intact step. Nothing is deleted:
a Checkpointer that trains moves the corrupt steps newer than the one it
restored to `<workdir>/corrupt_checkpoints` (so that training can write
those steps again); a read-only one (eval, analyze) leaves them in place.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import logging
from etils import epath
import flax
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gaternet_jax import paths
from gaternet_jax.errors import WorkdirError

# The file in each step folder where Orbax keeps the step's metadata
# (custom_metadata: train_seconds and the checksums), as JSON.
_STEP_METADATA = '_CHECKPOINT_METADATA'
# Unsigned integers of each itemsize: the words an array's checksum adds.
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32}
_barrier_ids = itertools.count()


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints` (absolute if local; a gs:// URI stays one)."""
  return paths.join(workdir, 'checkpoints')


def corrupt_dir(workdir: str) -> str:
  """`<workdir>/corrupt_checkpoints`: where training moves corrupt steps."""
  return paths.join(workdir, 'corrupt_checkpoints')


class _Corrupt(Exception):
  """A checkpoint step that cannot be read back as it was saved."""


def _reason(e: BaseException) -> str:
  """The innermost cause of `e` on one line ('OSError: ...', at most ~300
  characters): Orbax wraps TensorStore's error in a vaguer one."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = ' '.join(str(e).split())
  if len(text) > 300:
    text = text[:297] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _name(path: Tuple[Any, ...]) -> str:
  """'params/Dense_0/kernel' for a pytree path."""
  return '/'.join(
      str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
      for k in path
  )


def _checksum_host(x: np.ndarray) -> int:
  """sum_i (2i + 1) * word_i mod 2**32 over the array's elements in C order,
  each element's bits read as an unsigned word: any change of one element
  changes it (the weights are odd), as does swapping two."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32)
  else:
    words = x.view(_WORDS[x.dtype.itemsize]).astype(np.uint32)
  weights = np.arange(x.size, dtype=np.uint32).reshape(x.shape)
  weights = weights * np.uint32(2) + np.uint32(1)
  return int(np.sum(words * weights, dtype=np.uint32))


@jax.jit
def _checksum_device(x: jax.Array) -> jax.Array:
  """`_checksum_host` of a (sharded) jax.Array, computed where it lives."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    words = lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize])
    words = words.astype(jnp.uint32)
  index = jnp.zeros(x.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(x.ndim)):
    index += lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(
        stride % 2**32
    )
    stride *= x.shape[d]
  return jnp.sum(words * (index * 2 + 1), dtype=jnp.uint32)


def _checksum(x: Any) -> Any:
  """The checksum of an array leaf (an int, or a device scalar to fetch),
  or None for what has none (Python scalars, 64-bit and key dtypes)."""
  if isinstance(x, jax.Array):
    if (
        jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        or x.dtype.itemsize not in _WORDS
    ):
      return None
    if x.is_fully_addressable and all(d.platform == 'cpu' for d in x.devices()):
      return _checksum_host(np.asarray(x))  # No copy, no compilation.
    return _checksum_device(x)
  if isinstance(x, (np.ndarray, np.generic)):
    if x.dtype.kind == 'O' or x.dtype.itemsize not in _WORDS:
      return None
    return _checksum_host(np.asarray(x))
  return None


def checksums(tree: Any) -> Dict[str, int]:
  """{'params/.../kernel': checksum} of every array in `tree` that has one."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    c = _checksum(x)
    if c is not None:
      out[_name(path)] = c
  return {k: int(v) for k, v in jax.device_get(out).items()}


def _is_abandoned_read(unraisable: Any) -> bool:
  """Whether an unraisable exception is an abandoned Orbax array read: when
  one read of a restore fails, the reads still pending are closed once
  they finish (even after the restore returned), and each turns the
  GeneratorExit into an Exception whose traceback is dozens of lines."""
  e = unraisable.exc_value
  return (
      e is not None
      and isinstance(e.__cause__ or e.__context__, GeneratorExit)
      and str(e).startswith('Encountered error while reading array')
  )


def _quiet_abandoned_reads():
  """Drops abandoned reads' tracebacks from now on (other unraisable
  exceptions still reach the hook that was in place): once installed,
  for the rest of the process, since they come when the reads finish."""
  previous = sys.unraisablehook
  if getattr(previous, 'gaternet_jax_quiet', False):
    return

  def hook(unraisable):
    if _is_abandoned_read(unraisable):
      logging.debug('Abandoned checkpoint read: %s', unraisable.exc_value)
    else:
      previous(unraisable)

  hook.gaternet_jax_quiet = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
  # Their completions also reach Orbax's event loop after it closed, and
  # asyncio's RuntimeError there is printed by TensorStore's threads,
  # past any hook: a callback handed to a closed loop, which could never
  # run it, is dropped instead.
  loop_class = asyncio.base_events.BaseEventLoop
  handoff = loop_class.call_soon_threadsafe

  def call_soon_threadsafe(self, callback, *args, **kwargs):
    if self.is_closed():
      logging.debug('Dropped a callback for a closed event loop.')
      return None
    return handoff(self, callback, *args, **kwargs)

  loop_class.call_soon_threadsafe = call_soon_threadsafe  # type: ignore


class Checkpointer:
  """Saves and restores a train state (as its flax state dict).

  `restore` and `restore_raw` read the newest intact step (see the module
  docstring); `train_seconds()` is then that step's training time.
  """

  def __init__(
      self,
      workdir: str,
      *,
      max_to_keep: int = 3,
      save_every_steps: int = 1000,
      read_only: bool = False,
  ):
    self.directory = checkpoint_dir(workdir)
    self.corrupt_directory = corrupt_dir(workdir)
    self.read_only = read_only
    self._restored: Optional[Tuple[int, Mapping[str, Any]]] = None
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
    """The newest step folder, intact or not (None if there is none)."""
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
    the training time so far (`train_seconds`), a checksum of every array
    and `metadata` (JSON) in the step's metadata. Refuses (WorkdirError)
    to start a save the local disk has no room for."""
    if not force and not self._manager.should_save(int(step)):
      return False
    tree = flax.serialization.to_state_dict(state)
    custom: Dict[str, Any] = dict(metadata or {})
    custom['checksums'] = checksums(tree)
    if train_seconds is not None:
      custom['train_seconds'] = float(train_seconds)
    self._check_free_space(tree)
    # force: should_save said yes above (it is asked once, as before).
    saved = self._manager.save(
        int(step),
        args=ocp.args.StandardSave(tree),
        force=True,
        custom_metadata=custom,
    )
    if saved:
      self._restored = None  # train_seconds() is now the new step's.
    return saved

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
    the step `restore` last read, else the latest); {} if none or
    unreadable."""
    if self._restored is not None and step in (None, self._restored[0]):
      return self._restored[1]
    step = self.latest_step() if step is None else step
    if step is None:
      return {}
    try:
      return self._custom_metadata(step)
    except _Corrupt:
      return {}

  def train_seconds(self, step: Optional[int] = None) -> float:
    """Training time recorded with the checkpoint at `step` (0 if none);
    by default that of the step `restore` or `restore_raw` last read (if
    nothing was saved since), else of the latest step."""
    if step is None and self._restored is not None:
      step, custom = self._restored
    else:
      step = self.latest_step() if step is None else step
      if step is None:
        return 0.0
      try:
        custom = self._custom_metadata(step)
      except _Corrupt:
        return 0.0
    return float(custom.get('train_seconds', 0.0))

  def restore(self, state: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure, dtypes and shardings of `state`, from
    `step` or else the newest intact step.

    Raises:
      WorkdirError: the checkpoint holds another model, or every step (or
        `step`) is corrupt.
    """
    target = flax.serialization.to_state_dict(state)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, 'sharding', None)
        ),
        target,
    )

    def read(s: int, metadata: Any) -> Any:
      mismatch = _mismatch(_shapes(metadata), abstract)
      if mismatch:
        raise WorkdirError(
            f'The checkpoint at step {s} in {self.directory} does not match '
            f"this config's model ({mismatch}); use a new --workdir or the "
            f'config that wrote it.'
        )
      return self._manager.restore(s, args=ocp.args.StandardRestore(abstract))

    restored = self._newest_intact(read, step)
    return flax.serialization.from_state_dict(state, restored)

  def restore_raw(self, step: Optional[int] = None) -> Mapping[str, Any]:
    """The checkpoint at `step` (default: the newest intact one) as nested
    dicts of numpy arrays, whatever devices wrote it (a pod slice's
    checkpoint loads on one CPU): every array is read onto this process's
    first device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def read(s: int, metadata: Any) -> Any:
      abstract = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          getattr(metadata, 'tree', metadata),
      )
      restored = self._manager.restore(
          s, args=ocp.args.StandardRestore(abstract)
      )
      return jax.tree_util.tree_map(np.asarray, restored)

    return self._newest_intact(read, step)

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def _step_path(self, step: int):
    return self._manager.directory / str(step)

  def _custom_metadata(self, step: int) -> Mapping[str, Any]:
    """The step's custom metadata; _Corrupt if its metadata file is gone or
    garbled (Orbax itself would log an error and return none)."""
    folder = self._step_path(step)
    file = folder / _STEP_METADATA
    try:
      text = file.read_text()
    except FileNotFoundError as e:
      if folder.is_dir() and not any(folder.iterdir()):
        raise _Corrupt('its folder is empty') from e
      raise _Corrupt(f'it has no {_STEP_METADATA} file') from e
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(
          f'its {_STEP_METADATA} cannot be read ({_reason(e)})'
      ) from e
    try:
      metadata = json.loads(text)
      custom = metadata.get('custom_metadata') or {}
      if not isinstance(custom, dict):
        raise ValueError(f'custom_metadata is a {type(custom).__name__}')
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its {_STEP_METADATA} is garbled ({_reason(e)})') from e
    return custom

  def _read_step(
      self, step: int, read: Callable[[int, Any], Any]
  ) -> Tuple[Any, Mapping[str, Any]]:
    """(`read(step, its item metadata)`, the step's custom metadata),
    checked against the step's checksums; _Corrupt if any part is
    unreadable or garbled."""
    custom = self._custom_metadata(step)
    _quiet_abandoned_reads()
    try:
      metadata = self._manager.item_metadata(step)
      saved = _shapes(metadata)
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its array metadata cannot be read ({_reason(e)})') from e
    try:
      value = read(step, metadata)
    except (WorkdirError, MemoryError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _Corrupt(f'its arrays cannot be read ({_reason(e)})') from e
    expected = custom.get('checksums') or {}
    got = {}
    for path, x in jax.tree_util.tree_leaves_with_path(value):
      name = _name(path)
      # (An array restored into another dtype than saved has another sum.)
      if name in expected and saved.get(name, (None, None))[1] == x.dtype:
        got[name] = _checksum(x)
    got = jax.device_get(got)
    bad = sorted(
        k for k, v in got.items() if v is not None and int(v) != expected[k]
    )
    if bad:
      raise _Corrupt(
          f'{len(bad)} of its arrays ({", ".join(bad[:3])}'
          f'{", ..." if len(bad) > 3 else ""}) differ from the checksums '
          f'saved with them'
      )
    return value, custom

  def _newest_intact(
      self,
      read: Callable[[int, Any], Any],
      step: Optional[int],
  ) -> Any:
    """`read` of `step`, or else of the newest step that is intact (older
    ones are tried in turn, with a warning for each corrupt one)."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise WorkdirError(f'No checkpoint found in {self.directory}.')
    if step is not None:
      if step not in steps:
        raise WorkdirError(f'No checkpoint of step {step} in {self.directory}.')
      steps = [step]
    corrupt: List[int] = []
    for i, s in enumerate(steps):
      try:
        value, custom = self._read_step(s, read)
      except _Corrupt as e:
        corrupt.append(s)
        logging.warning(
            'Checkpoint step %d in %s is corrupt: %s; %s.',
            s,
            self.directory,
            e,
            f'trying step {steps[i + 1]}'
            if i + 1 < len(steps)
            else 'no older step is left',
        )
        continue
      if corrupt:
        self._set_aside(s, corrupt)
      self._restored = (s, custom)
      return value
    listed = ', '.join(map(str, corrupt))
    raise WorkdirError(
        f'The checkpoint step{"s" if len(corrupt) > 1 else ""} {listed} in '
        f'{self.directory} {"are all" if len(corrupt) > 1 else "is"} corrupt '
        f'(the warnings above say why; nothing was moved or deleted): '
        f'restore {"them" if len(corrupt) > 1 else "it"} from a backup, or '
        f'move {"them" if len(corrupt) > 1 else "it"} out of '
        f'{self.directory} to train this --workdir afresh.'
    )

  def _set_aside(self, restored: int, corrupt: List[int]):
    """Moves the corrupt steps (newer than `restored`) to
    `corrupt_directory` when training, so that Orbax no longer lists them
    and training can write those steps again; only warns when read-only."""
    listed = ', '.join(map(str, corrupt))
    if self.read_only:
      logging.warning(
          'Restored step %d of %s instead of the corrupt step(s) %s (left in '
          'place: this run only reads them).',
          restored,
          self.directory,
          listed,
      )
      return
    moved = []
    if jax.process_index() == 0:
      root = paths.resolve(self.corrupt_directory)
      root.mkdir(parents=True, exist_ok=True)
      for s in corrupt:
        target = root / str(s)
        for n in itertools.count(1):
          if not target.exists():
            break
          target = root / f'{s}.{n}'
        try:
          _move(self._step_path(s), target)
        except OSError as e:
          raise WorkdirError(
              f'Step {s} in {self.directory} is corrupt but cannot be moved '
              f'to {target} ({_reason(e)}); move it out of the way yourself.'
          ) from e
        moved.append(target.name)
    ocp.multihost.sync_global_processes(
        f'gaternet_jax_corrupt_steps_moved_{next(_barrier_ids)}'
    )
    self._manager.reload()
    logging.warning(
        'Restored step %d of %s instead of the corrupt step(s) %s, which '
        'were moved (not deleted) to %s%s.',
        restored,
        self.directory,
        listed,
        self.corrupt_directory,
        f' as {", ".join(moved)}' if moved else '',
    )


def _move(source: epath.Path, target: epath.Path):
  """Moves a folder: a rename where there are folders; on Cloud Storage,
  which has no rename, a copy of every file, then the removal of the
  originals."""
  if not paths.is_remote(source):
    source.rename(target)
    return
  copied = []
  for root, _, files in source.walk():
    for name in files:
      file = epath.Path(root) / name
      to = target / os.path.relpath(os.fspath(file), os.fspath(source))
      to.parent.mkdir(parents=True, exist_ok=True)
      file.copy(to)
      copied.append(to)
  target.mkdir(parents=True, exist_ok=True)  # (An empty step folder.)
  if not all(f.exists() for f in copied):
    raise OSError(f'the copy of {source} to {target} is incomplete')
  source.rmtree()


def _shapes(metadata: Any) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
  """{'params/.../kernel': (shape, dtype)} of a step's item metadata."""
  tree = getattr(metadata, 'tree', metadata)
  if not isinstance(tree, Mapping):
    raise ValueError(f'no tree of arrays in {type(metadata).__name__}')
  return {
      _name(path): (tuple(m.shape), np.dtype(m.dtype))
      for path, m in jax.tree_util.tree_leaves_with_path(tree)
  }


def _mismatch(
    saved: Mapping[str, Tuple[Tuple[int, ...], Any]], abstract: Any
) -> str:
  """How the saved arrays differ from `abstract`'s ('' if they match)."""
  want = {
      _name(path): tuple(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(abstract)
  }
  missing = sorted(set(want) - set(saved))
  if missing:
    return f'no {missing[0]} saved'
  extra = sorted(set(saved) - set(want))
  if extra:
    return f'{extra[0]} saved, not in this model'
  for name, shape in sorted(want.items()):
    if saved[name][0] != shape:
      return f'{name} saved with shape {saved[name][0]}, here {shape}'
  return ''


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds at least one checkpoint step folder.

  A corrupt step (even an empty folder) counts: the caller then restores,
  which falls back to an intact step or says that every step is corrupt,
  rather than treating the workdir as one that never trained.
  """
  if not paths.resolve(checkpoint_dir(workdir)).is_dir():
    return False
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.latest_step() is not None
  finally:
    ckpt.close()


def train_seconds(workdir: str, step: Optional[int] = None) -> float:
  """Training time recorded with `workdir`'s checkpoint at `step` (default:
  the latest step; 0 if there is none)."""
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    return ckpt.train_seconds(step)
  finally:
    ckpt.close()


def load_variables(workdir: str) -> Mapping[str, Any]:
  """{'params', 'batch_stats', 'step', 'train_seconds'} of the newest intact
  checkpoint in `workdir`."""
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
    seconds = ckpt.train_seconds()
  finally:
    ckpt.close()
  return {
      'params': raw['params'],
      'batch_stats': raw.get('batch_stats', {}),
      'step': int(np.asarray(raw['step'])),
      'train_seconds': seconds,
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
