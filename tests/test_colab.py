"""docs/colab/gaternet_tpu_demo.ipynb, executed top to bottom on the CPU.

The notebook runs in a python3 kernel of this interpreter with tiny sizes
(injected after its `parameters` cell, as papermill does) on a small
CIFAR-10 python archive built here in the official format, without network.
"""

import io
import json
import os
import pickle
import re
import sys
import tarfile

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
import nbclient
import nbformat
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'docs', 'colab', 'gaternet_tpu_demo.ipynb')
CIFAR10_CLASSES = (
    b'airplane',
    b'automobile',
    b'bird',
    b'cat',
    b'deer',
    b'dog',
    b'frog',
    b'horse',
    b'ship',
    b'truck',
)
FIGURES = ('gate_types_fraction.png', 'tsne.png', 'cost_vs_difficulty.png')
TINY = {
    'model.backbone.widths': (4, 8, 16),
    'model.gater.widths': (4, 8, 16),
    'model.backbone.depth': 8,
    'model.gater.depth': 8,
    'model.gater.bottleneck': 4,
    'analysis.dpi': 40,
}
IMAGE_INDEX = 3


def write_cifar10_archive(path, per_batch=32, num_test=48, seed=0):
  """A cifar-10-python.tar.gz as the official one is laid out: five
  data_batch_<i> and a test_batch, each a protocol-2 pickle of a dict with
  bytes keys whose b'data' is a (n, 3072) uint8 array of CHW-flattened
  rows, and batches.meta. Returns the test images as (n, 32, 32, 3)."""
  rng = np.random.default_rng(seed)
  test_images = None
  with tarfile.open(path, 'w:gz') as tar:

    def add(name, obj):
      # The official files were pickled by numpy 1 under Python 2.
      blob = pickle.dumps(obj, protocol=2).replace(
          b'numpy._core.multiarray', b'numpy.core.multiarray'
      )
      info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))

    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for name in names:
      n = num_test if name == 'test_batch' else per_batch
      labels = rng.integers(0, 10, n)
      # Each class its own brightness, so the runs learn something.
      hwc = np.clip(
          labels[:, None, None, None] * 20
          + rng.integers(0, 80, (n, 32, 32, 3)),
          0,
          255,
      ).astype(np.uint8)
      add(
          name,
          {
              b'batch_label': name.encode(),
              b'labels': [int(v) for v in labels],
              b'data': hwc.transpose(0, 3, 1, 2).reshape(n, 3072),
              b'filenames': [b'%d.png' % i for i in range(n)],
          },
      )
      if name == 'test_batch':
        test_images = hwc
    add(
        'batches.meta',
        {
            b'label_names': list(CIFAR10_CLASSES),
            b'num_cases_per_batch': per_batch,
            b'num_vis': 3072,
        },
    )
  return test_images


def _kernel_manager(tmp_path):
  """A python3 kernel of this interpreter (whatever other python3 kernels
  are installed), on the CPU, sharing the suite's compilation cache."""
  kernels = tmp_path / 'kernels'
  (kernels / 'python3').mkdir(parents=True)
  # XLA's CPU backend optimisations make up most of these tiny programs'
  # compile time (parameter init 25 s -> 5 s on 2 cores without them).
  xla_flags = os.environ.get('XLA_FLAGS', '')
  env = {
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': f'{xla_flags} --xla_backend_optimization_level=0'.strip(),
  }
  for key in (
      'JAX_COMPILATION_CACHE_DIR',
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES',
  ):
    if key in os.environ:
      env[key] = os.environ[key]
  spec = {
      'argv': [
          sys.executable,
          '-m',
          'ipykernel_launcher',
          '-f',
          '{connection_file}',
      ],
      'display_name': 'Python 3 (tests)',
      'language': 'python',
      'env': env,
  }
  (kernels / 'python3' / 'kernel.json').write_text(json.dumps(spec))
  ksm = KernelSpecManager(
      kernel_dirs=[str(kernels)], ensure_native_kernel=False
  )
  return AsyncKernelManager(kernel_name='python3', kernel_spec_manager=ksm)


def _with_parameters(nb, params):
  """`nb` with a cell setting `params` right after its `parameters` cell."""
  index = [
      i
      for i, c in enumerate(nb.cells)
      if 'parameters' in c.metadata.get('tags', [])
  ]
  assert len(index) == 1, 'the notebook needs one cell tagged parameters'
  cell = nbformat.v4.new_code_cell(
      '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  )
  cell.metadata['tags'] = ['injected-parameters']
  nb.cells.insert(index[0] + 1, cell)
  return nb


def _text(cell):
  return ''.join(
      o.get('text', '')
      for o in cell.outputs
      if o.output_type == 'stream' and o.name == 'stdout'
  )


def _pngs(cell):
  return [
      o
      for o in cell.outputs
      if o.output_type == 'display_data' and 'image/png' in o.data
  ]


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  for cell in nb.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.id


def test_notebook_runs_top_to_bottom(tmp_path):
  archive = tmp_path / 'cifar-10-python.tar.gz'
  test_images = write_cifar10_archive(archive)
  workdir = tmp_path / 'runs'
  params = dict(
      INSTALL=False,
      REPO_DIR=REPO,
      WORKDIR=str(workdir),
      TENSORBOARD=False,
      DIGITS_EPOCHS=1,
      DIGITS_OVERRIDES={
          'model.backbone.widths': (4, 8, 16),
          'model.gater.widths': (4, 8, 16),
      },
      CIFAR_SOURCE='python_archive',
      CIFAR_DATA_DIR=str(archive),
      DOWNLOAD_DIR=str(tmp_path / 'nothing_downloaded'),
      CIFAR_NUM_TRAIN=128,
      CIFAR_NUM_TEST=0,
      CIFAR_PRETRAIN_STEPS=4,
      CIFAR_STEPS=4,
      CIFAR_BATCH=16,
      CIFAR_EVAL_BATCH=48,
      STEPS_PER_CALL=2,
      CIFAR_OVERRIDES=TINY,
      TSNE_SAMPLES=48,
      BENCH_BATCH=8,
      BENCH_STEPS=2,
      BENCH_WARMUP=1,
      IMAGE_INDEX=IMAGE_INDEX,
  )
  nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), params)
  client = nbclient.NotebookClient(
      nb,
      km=_kernel_manager(tmp_path),
      kernel_name='python3',
      timeout=300,
      resources={'metadata': {'path': str(tmp_path)}},
  )
  client.execute()  # Raises CellExecutionError on any cell's error.
  cells = {c.id: c for c in nb.cells if 'id' in c}
  assert not (tmp_path / 'nothing_downloaded').exists()

  # Training printed baseline and gated accuracies.
  for cell_id in ('digits', 'cifar-train'):
    out = _text(cells[cell_id])
    for run in ('pretrain:baseline', 'final'):
      assert re.search(rf'^{run}\s+test\s+\d+\.\d\d%', out, re.M), out

  # The figures are in the workdir and inline in the notebook.
  analysis_dir = workdir / 'cifar10_r20' / 'analysis'
  for name in FIGURES:
    assert (analysis_dir / name).stat().st_size > 0, name
  assert len(_pngs(cells['analysis'])) == len(FIGURES)
  assert len(_pngs(cells['one-image'])) == 1
  assert 'baseline/gated images/s' in _text(cells['benchmark'])

  # The last cell's gates are the checkpoint's, for that test image.
  shown = json.loads(_text(cells['one-image']).strip().splitlines()[-1])
  expected = _checkpoint_gates(
      str(workdir / 'cifar10_r20'), test_images[IMAGE_INDEX : IMAGE_INDEX + 1]
  )
  assert shown['checkpoint_step'] == expected['step'] == 4
  assert shown['image_index'] == IMAGE_INDEX
  assert shown['predicted'] == expected['predicted']
  assert shown['gates_on'] == expected['gates_on']


def _checkpoint_gates(workdir, image):
  """Step, prediction and open gates of `image` under `workdir`'s latest
  checkpoint, computed here apart from the notebook."""
  from configs import cifar10_r20  # pylint: disable=g-import-not-at-top
  from gaternet_jax import augment, checkpoints  # pylint: disable=g-import-not-at-top
  from gaternet_jax.models import create_model  # pylint: disable=g-import-not-at-top

  config = cifar10_r20.get_config()
  for key, value in TINY.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  model = create_model(config.model, 10)
  saved = checkpoints.load_variables(workdir)
  x = augment.preprocess(image, mean=config.data.mean, std=config.data.std)
  logits, out = model.apply(
      {'params': saved['params'], 'batch_stats': saved['batch_stats']},
      x,
      train=False,
  )
  gates = out['gates']
  return {
      'step': saved['step'],
      'predicted': int(np.argmax(logits[0])),
      'gates_on': {
          name: np.flatnonzero(np.asarray(g[0]) > 0.5).tolist()
          for name, g in gates.items()
      },
  }
