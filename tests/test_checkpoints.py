"""Corrupt checkpoint steps are detected, named and survived (checkpoints.py).

Three steps of a tiny Dense model's train state are saved once; each test
corrupts a copy the way a crash, a full disk or bit rot would, and checks
that training's restore and eval's `load_variables` fall back to the newest
intact step with a warning naming the corrupt one, that training moves it
aside (and can save that step again) while eval leaves it in place, and
that nothing is ever deleted.
"""

import logging
import os
import shutil

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gaternet_jax import checkpoints
from gaternet_jax.errors import WorkdirError
from tests import helpers

STEPS = (1, 2, 3)
# pylint: disable=protected-access
_checksum_host = checkpoints._checksum_host
_checksum_device = checkpoints._checksum_device
# pylint: enable=protected-access


_state = helpers.dense_train_state


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('saved') / 'run')
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
  for step in STEPS:
    ckpt.save(step, _state(step), train_seconds=10.0 * step)
  ckpt.close()
  return workdir


@pytest.fixture
def workdir(saved, tmp_path):
  path = str(tmp_path / 'run')
  shutil.copytree(saved, path)
  return path


def _step_dir(workdir, step):
  return os.path.join(workdir, 'checkpoints', str(step))


def _array_file(workdir, step):
  """The step's largest OCDBT data file: the kernel's (compressed) bytes."""
  d = os.path.join(_step_dir(workdir, step), 'default', 'ocdbt.process_0', 'd')
  files = [os.path.join(d, f) for f in os.listdir(d)]
  return max(files, key=os.path.getsize)


def _garble(path, offset):
  with open(path, 'r+b') as f:
    f.seek(offset)
    data = f.read(16)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def _corrupt(workdir, step, how):
  folder = _step_dir(workdir, step)
  if how == 'truncated_array_file':
    path = _array_file(workdir, step)
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == 'garbled_array_file':  # Still decompresses: wrong values.
    path = _array_file(workdir, step)
    _garble(path, os.path.getsize(path) // 2)
  elif how == 'garbled_array_metadata':
    _garble(os.path.join(folder, 'default', '_METADATA'), 10)
  elif how == 'garbled_step_metadata':
    _garble(os.path.join(folder, '_CHECKPOINT_METADATA'), 10)
  elif how == 'missing_array_metadata':
    os.remove(os.path.join(folder, 'default', '_METADATA'))
  elif how == 'empty_step_folder':
    shutil.rmtree(folder)
    os.mkdir(folder)
  else:
    raise ValueError(how)


CORRUPTIONS = (
    'truncated_array_file',
    'garbled_array_file',
    'garbled_array_metadata',
    'garbled_step_metadata',
    'missing_array_metadata',
    'empty_step_folder',
)


def _files(workdir):
  """{relative path: bytes} of every file and folder under `workdir`."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), workdir) + '/'] = b''
    for f in files:
      path = os.path.join(root, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, workdir)] = fh.read()
  return out


def _warnings(caplog):
  return [
      r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
  ]


def _assert_params_of_step(params, step):
  want = _state(step).params
  for k in ('kernel', 'bias'):
    np.testing.assert_array_equal(np.asarray(params[k]), want[k])


def _assert_warned(caplog, workdir, step):
  directory = checkpoints.checkpoint_dir(workdir)
  named = [
      w
      for w in _warnings(caplog)
      if f'step {step} in {directory} is corrupt' in w
  ]
  assert len(named) == 1, _warnings(caplog)
  assert '\n' not in named[0]


@pytest.mark.parametrize('how', CORRUPTIONS)
def test_training_restores_the_newest_intact_step_and_moves_the_corrupt_one(
    workdir, how, caplog
):
  _corrupt(workdir, 3, how)
  before = _files(workdir)
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore(_state())
  assert int(state.step) == 2
  _assert_params_of_step(state.params, 2)
  assert ckpt.train_seconds() == 20.0
  _assert_warned(caplog, workdir, 3)
  # Moved, not deleted: the same files, bytes and folders.
  after = _files(workdir)
  moved = {
      k.replace('corrupt_checkpoints/3', 'checkpoints/3', 1): v
      for k, v in after.items()
      if k != 'corrupt_checkpoints/'
  }
  assert moved == before
  assert not os.path.exists(_step_dir(workdir, 3))
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '3'))
  # Orbax sees the move: training saves step 3 again.
  assert ckpt.latest_step() == 2
  assert ckpt.save(3, _state(4), train_seconds=40.0)
  ckpt.close()
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(_state())
  assert int(state.step) == 4 and ckpt.train_seconds() == 40.0
  ckpt.close()


@pytest.mark.parametrize('how', CORRUPTIONS)
def test_eval_loads_the_newest_intact_step_and_moves_nothing(
    workdir, how, caplog
):
  _corrupt(workdir, 3, how)
  before = _files(workdir)
  assert checkpoints.has_checkpoint(workdir)
  with caplog.at_level(logging.WARNING):
    saved = checkpoints.load_variables(workdir)
  assert saved['step'] == 2 and saved['train_seconds'] == 20.0
  _assert_params_of_step(saved['params'], 2)
  _assert_warned(caplog, workdir, 3)
  assert _files(workdir) == before
  # A read-only restore of a train state falls back too.
  ckpt = checkpoints.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(_state())
  assert int(state.step) == 2 and ckpt.train_seconds() == 20.0
  ckpt.close()
  assert _files(workdir) == before


def test_a_step_corrupt_again_is_moved_beside_the_first(workdir):
  _corrupt(workdir, 3, 'truncated_array_file')
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
  ckpt.restore(_state())
  ckpt.save(3, _state(3), force=True)
  ckpt.close()
  _corrupt(workdir, 3, 'empty_step_folder')
  ckpt = checkpoints.Checkpointer(workdir, save_every_steps=1)
  assert int(ckpt.restore(_state()).step) == 2
  ckpt.close()
  aside = os.path.join(workdir, 'corrupt_checkpoints')
  assert sorted(os.listdir(aside)) == ['3', '3.1']
  assert os.listdir(os.path.join(aside, '3'))  # The first, untouched.
  assert not os.listdir(os.path.join(aside, '3.1'))


@pytest.mark.parametrize('read_only', [False, True])
def test_every_step_corrupt_is_one_sentence_and_moves_nothing(
    workdir, read_only
):
  for step, how in zip(STEPS, CORRUPTIONS):
    _corrupt(workdir, step, how)
  before = _files(workdir)
  ckpt = checkpoints.Checkpointer(workdir, read_only=read_only)
  with pytest.raises(WorkdirError) as e:
    ckpt.restore(_state())
  ckpt.close()
  message = str(e.value)
  assert '\n' not in message
  assert 'steps 3, 2, 1' in message and 'all corrupt' in message
  assert 'nothing was moved or deleted' in message
  assert _files(workdir) == before
  with pytest.raises(WorkdirError, match='steps 3, 2, 1 .* all corrupt'):
    checkpoints.load_variables(workdir)
  assert _files(workdir) == before


def test_a_workdir_whose_only_step_is_an_empty_folder(tmp_path):
  os.makedirs(_step_dir(str(tmp_path), 5))
  # It has a (corrupt) checkpoint: eval and training report it rather than
  # treat the workdir as one that never trained.
  assert checkpoints.has_checkpoint(str(tmp_path))
  with pytest.raises(WorkdirError, match=r'step 5 in .* is corrupt'):
    checkpoints.load_variables(str(tmp_path))
  assert os.listdir(os.path.join(tmp_path, 'checkpoints')) == ['5']


def test_another_model_still_does_not_match(workdir):
  before = _files(workdir)
  ckpt = checkpoints.Checkpointer(workdir)
  with pytest.raises(
      WorkdirError, match=r"step 3 .* does not match this config's model"
  ):
    ckpt.restore(_state(width=32))
  ckpt.close()
  assert _files(workdir) == before


def test_a_step_saved_without_checksums_still_restores(tmp_path):
  # As steps written before the checksums were: train_seconds only.
  workdir = str(tmp_path / 'run')
  manager = ocp.CheckpointManager(
      checkpoints.checkpoint_dir(workdir),
      item_handlers=ocp.StandardCheckpointHandler(),
  )
  tree = flax.serialization.to_state_dict(_state(5))
  manager.save(
      5,
      args=ocp.args.StandardSave(tree),
      custom_metadata={'train_seconds': 50.0},
  )
  manager.wait_until_finished()
  manager.close()
  ckpt = checkpoints.Checkpointer(workdir)
  state = ckpt.restore(_state())
  assert int(state.step) == 5 and ckpt.train_seconds() == 50.0
  _assert_params_of_step(state.params, 5)
  ckpt.close()


def test_an_explicit_step_that_is_missing_or_corrupt(workdir):
  _corrupt(workdir, 2, 'truncated_array_file')
  ckpt = checkpoints.Checkpointer(workdir)
  assert int(ckpt.restore(_state(), step=1).step) == 1
  assert ckpt.train_seconds() == 10.0
  with pytest.raises(WorkdirError, match='No checkpoint of step 7 in '):
    ckpt.restore(_state(), step=7)
  with pytest.raises(WorkdirError, match=r'step 2 in .* is corrupt'):
    ckpt.restore(_state(), step=2)
  ckpt.close()
  assert os.path.isdir(_step_dir(workdir, 2))


@pytest.mark.parametrize(
    'dtype',
    ['float32', 'bfloat16', 'float16', 'int32', 'int8', 'uint8', 'bool'],
)
@pytest.mark.parametrize('shape', [(), (7,), (3, 5, 4)])
def test_checksum_on_host_and_device_agree_and_see_one_changed_word(
    dtype, shape
):
  x = jax.random.normal(jax.random.key(1), shape) * 50
  x = (x > 0) if dtype == 'bool' else x.astype(dtype)
  host = _checksum_host(np.asarray(x))
  device = _checksum_device(x)
  assert host == int(device)
  flat = np.asarray(x).ravel()
  changed = flat.copy()
  changed.view(f'u{flat.dtype.itemsize}')[-1] ^= 1  # One flipped bit.
  assert _checksum_host(changed.reshape(shape)) != host
  if x.size > 1:  # Swapped elements change it too.
    i = int(np.argmax(flat != flat[0]))
    assert i > 0
    swapped = flat.copy()
    swapped[[0, i]] = swapped[[i, 0]]
    assert _checksum_host(swapped.reshape(shape)) != host
