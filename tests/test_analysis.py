"""The gate analysis: statistics on hand-built gate matrices, and
--mode=analyze on tiny trained workdirs (GaterNet, batch-shaping, baseline)."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import default
from configs import digits_bas
from gaternet_jax import analysis
from gaternet_jax import cli
from gaternet_jax import metrics as metrics_lib
from gaternet_jax import plots
from gaternet_jax import train as train_lib
from gaternet_jax.errors import ConfigError, WorkdirError
from gaternet_jax.gates import GateSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = GateSpec(
    (('stage1_block1', 4), ('stage1_block2', 3), ('stage2_block1', 6))
)


def _hand_built():
  """10 samples x 13 gates with known kinds: per site, gate by gate."""
  n = 10
  cols = [
      # stage1_block1: on, off, on for 3, on for 9
      np.ones(n),
      np.zeros(n),
      np.arange(n) < 3,
      np.arange(n) < 9,
      # stage1_block2: off, off, on for 1
      np.zeros(n),
      np.zeros(n),
      np.arange(n) == 4,
      # stage2_block1: on, on, on for 5 (odd), on for 5 (first), off, on for 2
      np.ones(n),
      np.ones(n),
      np.arange(n) % 2 == 1,
      np.arange(n) < 5,
      np.zeros(n),
      np.arange(n) >= 8,
  ]
  gates = np.stack(cols, axis=1).astype(np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0])
  return gates, labels


def _collect(gates, labels, capacity=4):
  c = analysis.GateCollector(gates.shape[1], 3, capacity=capacity)
  for start in range(0, len(gates), 4):  # batches of 4, 4, 2
    sl = slice(start, start + 4)
    c.add(labels[sl], gates[sl], loss=np.arange(len(labels))[sl] * 1.0)
  return c


def test_gate_types_per_layer_and_stage():
  gates, labels = _hand_built()
  c = _collect(gates, labels)
  np.testing.assert_array_equal(
      c.on_counts, [10, 0, 3, 9, 0, 0, 1, 10, 10, 5, 5, 0, 2]
  )
  rows = analysis.gate_type_rows(c.on_counts, 10, SPEC)
  got = [
      (r['site'], r['always_on'], r['always_off'], r['input_dependent'])
      for r in rows
  ]
  assert got == [
      ('stage1_block1', 1, 1, 2),
      ('stage1_block2', 0, 2, 1),
      ('stage2_block1', 2, 1, 3),
  ]
  assert rows[2]['input_dependent_fraction'] == pytest.approx(0.5)
  groups = analysis.group_rows(rows)
  assert [
      (g['group'], g['sites'], g['gates'], g['always_off']) for g in groups
  ] == [('stage1', 2, 7, 3), ('stage2', 1, 6, 1)]
  assert groups[0]['always_off_fraction'] == pytest.approx(3 / 7)
  # Names with one common prefix fall back to one group per site.
  assert analysis.site_groups(['Mixed_5a', 'Mixed_6a']) == [
      ('Mixed_5a', [0]),
      ('Mixed_6a', [1]),
  ]


def test_on_count_histogram_and_frequent_gates():
  on = np.array([0, 100, 1, 50, 99, 50, 2, 100])
  np.testing.assert_array_equal(
      analysis.input_dependent_on_counts(on, 100), [1, 50, 99, 50, 2]
  )
  h = analysis.on_count_histogram(on, 100, bins=2)
  assert h['bin_edges'] == [1.0, 50.0, 99.0] and h['counts'] == [2, 3]
  assert analysis.frequent_gates(on, 100, 0.01, 0.99) == 5
  assert analysis.frequent_gates(on, 100, 0.02, 0.98) == 3
  assert analysis.frequent_gates(on, 100, 0.6, 0.99) == 1


def test_gates_on_per_sample_and_class_means():
  gates, labels = _hand_built()
  c = _collect(gates, labels)
  np.testing.assert_array_equal(c.column('gates_on'), gates.sum(axis=1))
  np.testing.assert_array_equal(c.column('label'), labels)
  np.testing.assert_array_equal(c.column('loss'), np.arange(10.0))
  np.testing.assert_array_equal(c.class_counts, [4, 3, 3])
  means = analysis.class_means(c.class_sums, c.class_counts)
  for k in range(3):
    np.testing.assert_allclose(
        means[k], gates[labels == k].mean(axis=0), rtol=1e-6
    )
  d = analysis.describe(c.column('gates_on'))
  assert (d['min'], d['max']) == (gates.sum(1).min(), gates.sum(1).max())
  # A class without samples has a NaN row.
  empty = analysis.class_means(np.zeros((2, 3), np.int32), np.array([2, 0]))
  assert np.all(empty[0] == 0) and np.all(np.isnan(empty[1]))


def test_packed_bits_round_trip_and_growth():
  rng = np.random.default_rng(0)
  gates = rng.random((37, 13)) < 0.4
  bits = analysis.pack_gates(gates)
  assert bits.shape == (37, 2) and bits.dtype == np.uint8
  np.testing.assert_array_equal(analysis.unpack_gates(bits, 13), gates)
  # The collector grows past its capacity and keeps every row's bits.
  c = analysis.GateCollector(13, 2, capacity=5)
  for start in range(0, 37, 8):
    c.add(
        np.zeros(len(gates[start : start + 8]), int), gates[start : start + 8]
    )
  assert c.num_samples == 37
  np.testing.assert_array_equal(c.bits, bits)
  np.testing.assert_array_equal(c.on_counts, gates.sum(axis=0))


def test_memory_grows_as_bits():
  # ImageNet's largest case: 50,000 samples x 47,872 gates, 1000 classes.
  c = analysis.GateCollector(47872, 1000, capacity=50000)
  assert c.bits.shape == (0, 5984)
  assert c._bits.nbytes == 50000 * 5984  # 0.3 GB: one bit per gate
  assert c.nbytes < 0.5e9  # with the (classes, gates) int32 sums
  rng = np.random.default_rng(0)
  g = rng.random((4, 47872)) < 0.5
  c.add(np.array([3, 3, 999, 0]), g)
  np.testing.assert_array_equal(analysis.unpack_gates(c.bits, 47872), g)
  np.testing.assert_array_equal(c.class_sums[3], g[:2].sum(axis=0))


def test_knn_label_agreement_on_constructed_cases():
  x = np.array(
      [
          [1, 1, 0, 0, 0, 0],
          [1, 1, 1, 0, 0, 0],
          [1, 1, 0, 1, 0, 0],
          [0, 0, 0, 0, 1, 1],
          [0, 0, 1, 0, 1, 1],
          [0, 0, 0, 1, 1, 1],
      ]
  )
  labels = np.array([0, 0, 0, 1, 1, 1])
  agree, chance = analysis.knn_label_agreement(x, labels, k=2, chunk=4)
  assert agree == pytest.approx(1.0)
  assert chance == pytest.approx(2 * 3 * 2 / (6 * 5))
  # Twins with different labels: the nearest neighbour always disagrees.
  twins = np.array([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]])
  agree, _ = analysis.knn_label_agreement(twins, np.array([0, 1, 0, 1]), k=1)
  assert agree == pytest.approx(0.0)
  # Identical vectors: every other sample ties, so agreement is chance.
  agree, chance = analysis.knn_label_agreement(
      np.zeros((5, 4)), np.array([0, 0, 1, 1, 1]), k=2
  )
  assert agree == pytest.approx(chance) and chance == pytest.approx(0.4)
  # k larger than the samples uses all the others.
  agree, _ = analysis.knn_label_agreement(x, labels, k=50)
  assert agree == pytest.approx(2 / 5)


def test_difficulty_bins_and_correlations():
  loss = np.array([0.1, 0.0, 0.5, 0.3, 0.2, 0.4])
  cost = loss * 10 + 1
  bins = analysis.equal_count_bins(loss, {'cost': cost}, 3, 'loss')
  assert [b['count'] for b in bins] == [2, 2, 2]
  assert [b['cost_mean'] for b in bins] == pytest.approx([1.5, 3.5, 5.5])
  assert bins[0]['loss_min'] == 0.0 and bins[2]['loss_max'] == 0.5
  r = analysis.correlations(cost, loss)
  assert r['pearson'] == pytest.approx(1.0)
  assert r['spearman'] == pytest.approx(1.0)
  r = analysis.correlations(-np.exp(loss * 9), loss)
  assert r['spearman'] == pytest.approx(-1.0) and r['pearson'] > -1.0
  assert analysis.correlations(np.ones(6), loss) == {
      'pearson': None,
      'spearman': None,
  }
  # Ties in the key cannot empty a bin.
  bins = analysis.equal_count_bins(
      np.zeros(7), {'cost': cost.tolist() + [0]}, 3, 'loss'
  )
  assert [b['count'] for b in bins] == [3, 2, 2]


def test_embedding_drops_constant_gates():
  rng = np.random.default_rng(0)
  x = np.concatenate(
      [np.ones((40, 3)), rng.random((40, 5)) < 0.5, np.zeros((40, 2))], axis=1
  )
  x = analysis.informative_columns(x)
  assert x.shape == (40, 5)
  xy, dims = analysis.embed_2d(x, pca_dims=3, perplexity=30.0, seed=0)
  assert xy.shape == (40, 2) and dims == 3 and np.all(np.isfinite(xy))
  xy2, _ = analysis.embed_2d(x, pca_dims=3, perplexity=30.0, seed=0)
  np.testing.assert_allclose(xy, xy2)  # deterministic for a seed
  assert analysis.embed_2d(np.zeros((40, 0)), 3, 30.0, 0) == (None, 0)


# ---------------------------------------------------------------------------
# --mode=analyze on tiny trained workdirs (the digits, no download).


def _tiny(config):
  config.model.backbone.widths = (4, 8, 16)
  config.model.gater.widths = (4, 8, 16)
  config.pretrain.enabled = False
  config.num_train_steps = 4
  config.eval_batch_size = 200  # 360 test images: the last batch is padded
  config.checkpoint_every_steps = 4
  config.progress_every_secs = 1000.0
  config.tensorboard = False
  config.analysis.tsne_samples = 300
  config.analysis.dpi = 50
  return config


def _files(workdir):
  """{path: (mtime, size)} of everything outside workdir/analysis."""
  out = {}
  for root, _, files in os.walk(workdir):
    if os.path.relpath(root, workdir).split(os.sep)[0] == analysis.OUT_DIR:
      continue
    for f in files:
      st = os.stat(os.path.join(root, f))
      out[os.path.join(root, f)] = (st.st_mtime_ns, st.st_size)
  return out


def _check_figures(out_dir, names, dpi):
  want = (round(plots.FIGSIZE[0] * dpi), round(plots.FIGSIZE[1] * dpi))
  for name in names:
    with Image.open(os.path.join(out_dir, name)) as im:
      im.verify()  # a complete, valid PNG
    with Image.open(os.path.join(out_dir, name)) as im:
      assert im.format == 'PNG' and im.size == want, (name, im.size)


def _check_gated_result(r, results, spec_total):
  assert r['num_examples'] == 360 and r['split'] == 'test'
  # Same model, same split: what training's eval measured.
  assert r['accuracy'] == pytest.approx(results['accuracy'], abs=1e-6)
  assert r['macs']['macs_mean'] == pytest.approx(results['macs_mean'])
  t = r['gate_types']
  assert (t['always_on'], t['always_off'], t['input_dependent']) == (
      results['gates_always_on'],
      results['gates_always_off'],
      results['gates_input_dependent'],
  )
  assert t['always_on'] + t['always_off'] + t['input_dependent'] == spec_total
  assert sum(s['gates'] for s in r['gate_types_per_site']) == spec_total
  assert sum(r['on_count_histogram']['counts']) == t['input_dependent']
  g = r['gates_on_per_sample']
  assert 0 <= g['min'] <= g['mean'] <= g['max'] <= spec_total
  assert g['mean'] / spec_total == pytest.approx(
      results['gates_on_fraction'], abs=1e-6
  )
  e = r['embedding']
  assert e['samples'] == 300 and 0.0 <= e['knn_agreement'] <= 1.0
  assert 0.09 < e['knn_chance'] < 0.12  # ten nearly balanced classes
  assert sum(b['count'] for b in r['difficulty']['loss_bins']) == 360
  assert sum(c['count'] for c in r['per_class']) == 360
  assert sorted(r['figures']) == sorted(analysis.FIGURES.values())


def test_analyze_gaternet_workdir(tmp_path, capsys):
  config = _tiny(default.get_config())
  wd = str(tmp_path / 'gaternet')
  results = train_lib.train(config, wd)
  before = _files(wd)
  out = cli.run('analyze', config, wd)
  printed = capsys.readouterr().out
  assert 'always off' in printed and '10-NN label agreement' in printed
  assert json.loads(printed.strip().splitlines()[-1]) == json.loads(
      json.dumps(out)
  )
  assert out['gating'] == 'gater' and out['gated_filters'] == 28
  out_dir = os.path.join(wd, 'analysis')
  with open(os.path.join(out_dir, 'analysis.json'), encoding='utf-8') as f:
    r = json.load(f)
  _check_gated_result(r, results, 28)
  assert r['difficulty']['cost'] == 'macs'
  _check_figures(out_dir, r['figures'], 50)
  assert _files(wd) == before  # nothing outside analysis/ touched
  # No checkpoint: one clear error, and nothing written.
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(WorkdirError, match='no checkpoint'):
    analysis.run_analysis(config, str(empty))
  assert not os.listdir(empty)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.analysis.split = 'validation'
  with pytest.raises(ConfigError, match='analysis.split'):
    analysis.run_analysis(bad, wd)


def test_analyze_batch_shaping_workdir_through_main(tmp_path, capsys):
  config = _tiny(digits_bas.get_config())
  config.model.local_gating.hidden = 4
  config.tensorboard = True
  wd = str(tmp_path / 'bas')
  results = train_lib.train(config, wd)
  before = _files(wd)
  flags = [
      '--config=configs/digits_bas.py',
      f'--workdir={wd}',
      '--mode=analyze',
      '--config.model.backbone.widths=(4,8,16)',
      '--config.model.gater.widths=(4,8,16)',
      '--config.model.local_gating.hidden=4',
      '--config.pretrain.enabled=False',
      '--config.num_train_steps=4',
      '--config.eval_batch_size=200',
      '--config.analysis.tsne_samples=300',
      '--config.analysis.dpi=50',
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  first = cli.run('analyze', config, wd)
  # Again through main.py: the re-run replaces its own outputs.
  proc = subprocess.run(
      [sys.executable, 'main.py', *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out == json.loads(json.dumps(first))  # deterministic
  assert out['gating'] == 'local' and out['gated_filters'] == 28
  out_dir = os.path.join(wd, 'analysis')
  with open(os.path.join(out_dir, 'analysis.json'), encoding='utf-8') as f:
    r = json.load(f)
  _check_gated_result(r, results, 28)
  _check_figures(out_dir, r['figures'], 50)
  events = [f for f in os.listdir(out_dir) if f.startswith('events.out')]
  assert len(events) == (1 if metrics_lib.tensorboard_available() else 0)
  assert _files(wd) == before
  # --mode=analyze needs a workdir.
  proc = subprocess.run(
      [sys.executable, 'main.py', *flags[:1], '--mode=analyze'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr
  assert '--workdir is required' in proc.stderr.strip().splitlines()[-1]


def test_analyze_baseline_workdir(tmp_path, capsys):
  config = _tiny(default.get_config())
  config.model.gating = 'none'
  wd = str(tmp_path / 'baseline')
  results = train_lib.train(config, wd)
  out = cli.run('analyze', config, wd)
  assert 'no gates' in capsys.readouterr().out
  assert out['gating'] == 'none' and out['gated_filters'] == 0
  out_dir = os.path.join(wd, 'analysis')
  with open(os.path.join(out_dir, 'analysis.json'), encoding='utf-8') as f:
    r = json.load(f)
  assert 'no gates' in r['note'] and r['figures'] == []
  assert r['accuracy'] == pytest.approx(results['accuracy'], abs=1e-6)
  assert r['macs']['macs_dense'] == results['macs_dense'] > 0
  assert r['macs']['macs_mean'] == r['macs']['macs_dense']
  assert 'gate_types' not in r
  assert os.listdir(out_dir) == ['analysis.json']
