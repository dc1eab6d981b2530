"""Import of the official PyTorch GaterNet checkpoints.

google-research/gaternet publishes CIFAR-10 ResNet-20-Gated and
ResNet-56-Gated checkpoints: a `torch.save` file holding a dict with
'backbone_state_dict' and 'gater_state_dict' (keys possibly prefixed by
'module.' from `nn.DataParallel`). This module maps them onto our
`GaterNet` so that, on images normalised with `OFFICIAL_MEAN` /
`OFFICIAL_STD`,

  model, variables = load_official_checkpoint('resnet20_gated.pth')
  logits, out = model.apply(variables, images_nhwc, train=False)

gives the official model's logits (and its gates in `out['gates']`).

Layout of the official networks, as mapped here:
- backbone: `conv`, `bn`, `stage{s}.block{i}.{conv1,bn1,conv2,bn2}` plus
  `stage{s}.block1.shortcut.{conv,bn}` where the width changes, and `fc`.
  The gate multiplies the output of `bn2` before the residual add; the gate
  vector is laid out stage-major, block order, one contiguous slice of the
  block's width per block: exactly our `GateSpec` order.
- gater: a ResNet-20 under `resnet.` whose pooled features go through
  `resnet.newfc` (64 -> 8), a ReLU and `fnn.fc.0` (8 -> gates). There is no
  BatchNorm between the two FCs, so our gater is built with
  `batchnorm=False`.

torch is an optional extra: it is imported only inside the function that
reads a file, and `convert_state_dicts` accepts numpy arrays.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gaternet_jax.errors import UserError
from gaternet_jax.models import create_model
from gaternet_jax.models.gaternet import GaterNet

# Per-channel normalisation of the official evaluation (RGB, on [0, 1] pixels).
OFFICIAL_MEAN = (0.4914, 0.4822, 0.4465)
OFFICIAL_STD = (0.2470, 0.2435, 0.2616)

OFFICIAL_NUM_CLASSES = 10
OFFICIAL_WIDTHS = (16, 32, 64)
OFFICIAL_GATER_DEPTH = 20
OFFICIAL_BOTTLENECK = 8

_BACKBONE_SD = 'backbone_state_dict'
_GATER_SD = 'gater_state_dict'

# Buffers PyTorch keeps that have no counterpart in flax.
_IGNORED_SUFFIXES = ('num_batches_tracked',)

# flax leaf name -> PyTorch parameter/buffer name.
_LEAF_NAMES = {
    'kernel': 'weight',
    'scale': 'weight',
    'bias': 'bias',
    'mean': 'running_mean',
    'var': 'running_var',
}

StateDict = Mapping[str, Any]


def _check_depth(depth: int, what: str) -> int:
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)):
    raise UserError(f'{what} must be an integer like 20 or 56; got {depth!r}.')
  depth = int(depth)
  if depth < 8 or (depth - 2) % 6:
    raise UserError(
        f'{what} must be 6n+2 (the official checkpoints are 20 '
        f'and 56); got {depth}.'
    )
  return depth


def official_model_config(
    backbone_depth: int = 20,
) -> ml_collections.ConfigDict:
  """The `create_model` config of the official GaterNet (CIFAR-10).

  Args:
    backbone_depth: 20 or 56 for the published checkpoints (any 6n+2 works).

  Returns:
    A ConfigDict with fields gating, dtype, backbone, gater, semhash; pass
    it with `num_classes=OFFICIAL_NUM_CLASSES` to `create_model`. Its gates
    are binarised the official code's way (`semhash.binarize='official'`),
    so the official checkpoints' gates come out exactly.
  """
  backbone_depth = _check_depth(backbone_depth, 'backbone_depth')
  return ml_collections.ConfigDict(
      {
          'gating': 'gater',
          'dtype': 'float32',
          'backbone': {
              'name': 'cifar_resnet',
              'depth': backbone_depth,
              'widths': OFFICIAL_WIDTHS,
              'se_reduction': 0,
          },
          'gater': {
              'name': 'cifar_resnet',
              'depth': OFFICIAL_GATER_DEPTH,
              'widths': OFFICIAL_WIDTHS,
              'bottleneck': OFFICIAL_BOTTLENECK,
              # The official gater is newfc -> ReLU -> fc, with no BatchNorm.
              'batchnorm': False,
          },
          # The official training settings of Improved SemHash (gater_resnet.py:
          # unit Gaussian noise, half the samples binary); unused at evaluation.
          'semhash': {
              'mix_prob': 0.5,
              'noise_std': 1.0,
              # saturating_sigmoid(logit) > 0.49999, as gater_resnet.py does.
              'binarize': 'official',
          },
      }
  )


def _official_model(backbone_depth: int) -> GaterNet:
  return create_model(
      official_model_config(backbone_depth), num_classes=OFFICIAL_NUM_CLASSES
  )


def _expected_variables(model: GaterNet) -> Dict[str, Any]:
  """ShapeDtypeStructs of `model.init`'s variables, without computing them."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), images)


def _torch_module_path(names: Tuple[str, ...]) -> str:
  """Our module names below a ResNet -> the official dotted module path."""
  out = []
  for name in names:
    m = re.fullmatch(r'stage(\d+)_block(\d+)', name)
    if m:
      out.append(f'stage{m.group(1)}.block{m.group(2)}')
    elif name in ('shortcut_conv', 'shortcut_bn'):
      out.append(name.replace('_', '.'))
    else:
      out.append(name)
  return '.'.join(out)


def _torch_key(path: Tuple[str, ...]) -> Tuple[str, str]:
  """A flax variable path -> (which state dict, official key).

  Args:
    path: `(collection, 'backbone' | 'gater', module..., leaf)`, e.g.
      `('batch_stats', 'gater', 'features', 'stage2_block1', 'shortcut_bn',
      'mean')`.

  Returns:
    `('backbone_state_dict', 'stage2.block1.shortcut.bn.running_mean')`-style
    pairs.
  """
  _, top, *modules, leaf = path
  torch_leaf = _LEAF_NAMES[leaf]
  if top == 'backbone':
    return _BACKBONE_SD, f'{_torch_module_path(tuple(modules))}.{torch_leaf}'
  assert top == 'gater', path
  if modules[0] == 'features':
    prefix = _torch_module_path(tuple(modules[1:]))
    return _GATER_SD, f'resnet.{prefix}.{torch_leaf}'
  if modules == ['fc1']:
    return _GATER_SD, f'resnet.newfc.{torch_leaf}'
  if modules == ['fc2']:
    return _GATER_SD, f'fnn.fc.0.{torch_leaf}'
  raise AssertionError(f'no official counterpart for {path}')


def _strip_module_prefix(state_dict: StateDict, which: str) -> Dict[str, Any]:
  """Drops the 'module.' prefix(es) that `nn.DataParallel` adds to keys."""
  if not isinstance(state_dict, Mapping):
    raise UserError(
        f'{which} must be a dict of tensors or arrays; got '
        f'{type(state_dict).__name__}.'
    )
  out = {}
  for key, value in state_dict.items():
    if not isinstance(key, str):
      raise UserError(f'{which} has a non-string key {key!r}.')
    name = key
    while name.startswith('module.'):
      name = name[len('module.') :]
    if name in out:
      raise UserError(
          f'{which} holds {name!r} twice, with and without the '
          f"'module.' prefix."
      )
    out[name] = value
  return out


def _to_numpy(value: Any, which: str, key: str) -> np.ndarray:
  """A torch tensor or array-like -> numpy, without importing torch."""
  if hasattr(value, 'detach'):  # torch.Tensor; .float() also covers bfloat16.
    value = value.detach().cpu().float().numpy()
  try:
    array = np.asarray(value)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{which} key {key!r} is not an array ({e}).') from e
  if not np.issubdtype(array.dtype, np.number):
    raise UserError(
        f'{which} key {key!r} holds {array.dtype} values, not ' 'numbers.'
    )
  return array


def _to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)  # conv OIHW -> HWIO
  if leaf == 'kernel' and array.ndim == 2:
    return array.T  # Linear (out, in) -> Dense (in, out)
  return array


def _torch_shape(shape: Tuple[int, ...], leaf: str) -> Tuple[int, ...]:
  """The official shape of a flax variable: inverse of `_to_flax_layout`."""
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _infer_backbone_depth(backbone_sd: Mapping[str, Any]) -> Optional[int]:
  """The depth 6n+2 a backbone state dict was saved with, for error hints."""
  n = 0
  for key in backbone_sd:
    m = re.match(r'stage1\.block(\d+)\.', key)
    if m:
      n = max(n, int(m.group(1)))
  return 6 * n + 2 if n else None


def convert_state_dicts(
    backbone_sd: StateDict, gater_sd: StateDict, backbone_depth: int = 20
) -> Dict[str, Any]:
  """Official state dicts -> our GaterNet's variables.

  Args:
    backbone_sd: the official backbone's state dict (torch tensors or numpy
      arrays; 'module.' prefixes allowed). Conv weights `(out, in, kh, kw)`,
      Linear weights `(out, in)`.
    gater_sd: the official gater's state dict, likewise.
    backbone_depth: depth of the backbone ResNet (20 or 56).

  Returns:
    `{'params': ..., 'batch_stats': ...}`, nested dicts of float32 jnp arrays
    with exactly the structure and shapes of
    `create_model(official_model_config(backbone_depth), 10).init(...)`:
    conv kernels `(kh, kw, in, out)`, Dense kernels `(in, out)`.

  Raises:
    UserError: a key is missing, unexpected or of the wrong shape.
  """
  backbone_depth = _check_depth(backbone_depth, 'backbone_depth')
  sds = {
      _BACKBONE_SD: _strip_module_prefix(backbone_sd, _BACKBONE_SD),
      _GATER_SD: _strip_module_prefix(gater_sd, _GATER_SD),
  }
  ckpt_depth = _infer_backbone_depth(sds[_BACKBONE_SD])
  depth_hint = ''
  if ckpt_depth is not None and ckpt_depth != backbone_depth:
    depth_hint = (
        f" (the checkpoint's backbone looks like depth "
        f'{ckpt_depth}: pass backbone_depth={ckpt_depth})'
    )

  expected = _expected_variables(_official_model(backbone_depth))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(expected)
  paths = [tuple(k.key for k in key_path) for key_path, _ in leaves]
  keys = [_torch_key(path) for path in paths]

  # Missing and unexpected keys first: they name the structural mismatch
  # (e.g. the depth), which a shape error further down would only imply.
  for path, (which, key) in zip(paths, keys):
    if key not in sds[which]:
      raise UserError(
          f'{which} lacks key {key!r}, needed for '
          f'{"/".join(path)}{depth_hint}.'
      )
  for which, sd in sds.items():
    used = {key for w, key in keys if w == which}
    extra = [
        k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES)
    ]
    if extra:
      more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
      raise UserError(
          f'{which} has unexpected key {extra[0]!r}{more} for a '
          f'depth-{backbone_depth} GaterNet{depth_hint}.'
      )

  arrays = []
  for path, (which, key), (_, struct) in zip(paths, keys, leaves):
    array = _to_numpy(sds[which][key], which, key)
    want = _torch_shape(tuple(struct.shape), path[-1])
    if array.shape != want:
      raise UserError(
          f'{which} key {key!r} has shape {array.shape}, but '
          f'{"/".join(path)} needs {want}{depth_hint}.'
      )
    array = _to_flax_layout(array, path[-1])
    arrays.append(jnp.asarray(array, dtype=struct.dtype))
  return jax.tree_util.tree_unflatten(treedef, arrays)


def _load_torch_file(path: Union[str, os.PathLike]) -> Any:
  """torch.load of a checkpoint file, with failures as UserErrors."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f'Checkpoint file {path!r} does not exist.')
  if os.path.isdir(path):
    raise UserError(
        f'Checkpoint path {path!r} is a directory, not a ' 'torch.save file.'
    )
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(
        'Reading an official PyTorch checkpoint needs torch: '
        'pip install torch (or pip install gaternet-jax[torch]).'
    ) from e
  try:
    # weights_only: the file is a pickle, and this refuses arbitrary code.
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [''])[0]
    raise UserError(
        f'Could not read {path!r} with torch.load(map_location="cpu", '
        f'weights_only=True): it is not a torch.save file of plain state '
        f'dicts ({type(e).__name__}: {reason}).'
    ) from e


def load_official_checkpoint(
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]],
    backbone_depth: int = 20,
) -> Tuple[GaterNet, Dict[str, Any]]:
  """Loads an official GaterNet checkpoint as our model and variables.

  Args:
    path_or_state_dict: path of the official `torch.save` file, or the dict
      it holds (with 'backbone_state_dict' and 'gater_state_dict').
    backbone_depth: 20 (ResNet-20-Gated) or 56 (ResNet-56-Gated).

  Returns:
    `(model, variables)`: `model.apply(variables, images, train=False)` maps
    `(batch, 32, 32, 3)` float32 images, normalised with OFFICIAL_MEAN /
    OFFICIAL_STD, to `((batch, 10) logits, out)`, `out['gates']` the gate
    PyTree. The gates are
    the official code's: saturating_sigmoid(logit) > 0.49999, i.e. logit >
    about -3.3e-5 (the paper's 1(logit > 0) differs for logits in
    (-3.3e-5, 0]).

  Raises:
    UserError: a missing or unreadable file, missing torch, or a checkpoint
      that does not fit a depth-`backbone_depth` GaterNet.
  """
  backbone_depth = _check_depth(backbone_depth, 'backbone_depth')
  if isinstance(path_or_state_dict, Mapping):
    checkpoint = path_or_state_dict
  elif isinstance(path_or_state_dict, (str, os.PathLike)):
    checkpoint = _load_torch_file(path_or_state_dict)
  else:
    raise UserError(
        'load_official_checkpoint takes a checkpoint path or the '
        'dict it holds; got '
        f'{type(path_or_state_dict).__name__}.'
    )
  if not isinstance(checkpoint, Mapping):
    raise UserError(
        'The checkpoint holds a '
        f'{type(checkpoint).__name__}, not a dict with '
        f"'{_BACKBONE_SD}' and '{_GATER_SD}'."
    )
  for key in (_BACKBONE_SD, _GATER_SD):
    if key not in checkpoint:
      raise UserError(
          f'The checkpoint lacks {key!r} (it has '
          f'{sorted(map(str, checkpoint))[:5]}); expected an '
          'official GaterNet checkpoint.'
      )
  variables = convert_state_dicts(
      checkpoint[_BACKBONE_SD], checkpoint[_GATER_SD], backbone_depth
  )
  return _official_model(backbone_depth), variables


__all__ = [
    'OFFICIAL_MEAN',
    'OFFICIAL_STD',
    'OFFICIAL_NUM_CLASSES',
    'official_model_config',
    'convert_state_dicts',
    'load_official_checkpoint',
]
