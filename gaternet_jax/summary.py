"""Parameter and gate counts of a config's model, without data or training."""

from __future__ import annotations

from typing import Any, Dict

import jax
from flax import traverse_util
import ml_collections

from gaternet_jax import data as data_lib
from gaternet_jax import macs as macs_lib
from gaternet_jax.models import create_model


def count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def model_summary(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Counts from `jax.eval_shape` of the model's init (no FLOPs spent).

  Returns params_total, params_backbone, params_gater, gated_filters,
  gated_sites, gating ('gater', 'local' or 'none'), macs_backbone and
  macs_gater (dense MACs per image: the backbone with every gate open, and
  what the gater or the gating modules add), num_classes and image_shape.
  Batch-shaping's gating modules live inside the backbone's units, so their
  parameters count in params_backbone (and, on their own, in
  params_gating_modules) and their MACs in macs_gater. A compacted model
  adds params_uncompacted, macs_backbone_uncompacted and
  gated_filters_uncompacted: the network before `--mode=compact`.
  """
  image_shape, num_classes = data_lib.dataset_info(config.data)
  model = create_model(config.model, num_classes)
  # One trace of the model's init gives both its MACs and its variables.
  counter, variables = macs_lib.count_with_variables(
      model, image_shape, conditional=False
  )
  params = variables['params']
  spec = model.gate_spec()
  flat = traverse_util.flatten_dict(params.get('backbone', {}))
  gating_modules = sum(
      v.size for k, v in flat.items() if macs_lib.LOCAL_GATE_MODULE in k[:-1]
  )
  out = {
      'params_total': count(params),
      'params_backbone': count(params.get('backbone', {})),
      'params_gater': count(params.get('gater', {})),
      'params_gating_modules': int(gating_modules),
      'gated_filters': spec.total,
      'gated_sites': len(spec),
      'gating': model.gating,
      'macs_backbone': counter.dense_backbone,
      'macs_gater': counter.dense_gater,
      'num_classes': num_classes,
      'image_shape': list(image_shape),
  }
  if config.model.get('compaction'):
    # A compacted model (models/compaction.py): the network it came from.
    full = config.copy_and_resolve_references()
    with full.unlocked():
      full.model.compaction = ''
    before = model_summary(full)
    out.update(
        params_uncompacted=before['params_total'],
        macs_backbone_uncompacted=before['macs_backbone'],
        gated_filters_uncompacted=before['gated_filters'],
    )
  return out
