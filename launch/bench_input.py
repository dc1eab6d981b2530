"""Throughput of the tf.data input pipeline alone, stage by stage.

  python launch/bench_input.py --data_dir=/path/to/jpegs --num_images=2000

Reads a flat folder of images (or data_dir/<class>/* with --class_folders),
repeats the file list to --num_images and prints images/s for:
  1. read             file bytes only (tf.io.read_file),
  2. train decode     + fused decode and random-resized crop, resize, flip
                      (one image at a time),
  3. train batches    TfdataDataset.train_batches: + batching to numpy,
     eval batches     TfdataDataset.eval_batches (center crop, padded).
Labels come from a labels.csv (filename,...,class_index,...) next to or
above the images, else 0. The first --warmup_images of each stage (tracing,
thread start-up) are not timed.
"""

import csv
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import ConfigDict

# Runs from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from gaternet_jax import input_pipeline
from gaternet_jax import sources

# pylint: enable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string(
    'data_dir',
    '/work/shared/data/imagenet_samples/images',
    'Folder of .JPEG/.jpg/.png images.',
)
flags.DEFINE_bool(
    'class_folders',
    False,
    'data_dir holds <class>/<image>; labels from sorted names.',
)
flags.DEFINE_integer(
    'num_images', 1000, 'Images per stage; the file list is repeated to this.'
)
flags.DEFINE_integer('warmup_images', 128, 'Untimed images per stage.')
flags.DEFINE_integer('batch_size', 64, 'Batch size of stage 3.')
flags.DEFINE_integer('image_size', 224, 'Output side.')
flags.DEFINE_enum(
    'resize_method',
    'bilinear',
    ['bilinear', 'bicubic'],
    'tf.image.resize method.',
)
flags.DEFINE_bool('antialias', True, 'Antialiased downscaling.')
flags.DEFINE_list(
    'stages',
    ['read', 'train_decode', 'train_batches', 'eval_batches'],
    'Stages to run.',
)
FLAGS = flags.FLAGS


def _file_list(data_dir, class_folders):
  """(paths, labels) of the images under data_dir."""
  if class_folders:
    tree = sources.scan_image_folder(data_dir)
    paths, labels = [], []
    for label, files in enumerate(tree.values()):
      paths += files
      labels += [label] * len(files)
    return paths, labels
  names = sorted(
      n
      for n in os.listdir(data_dir)
      if n.lower().endswith(('.jpeg', '.jpg', '.png')) and not n.startswith('.')
  )
  by_name = {}
  for folder in (data_dir, os.path.dirname(os.path.normpath(data_dir))):
    csv_path = os.path.join(folder, 'labels.csv')
    if os.path.isfile(csv_path):
      with open(csv_path, newline='', encoding='utf-8') as f:
        by_name = {
            row['filename']: int(row['class_index'])
            for row in csv.DictReader(f)
        }
      break
  return (
      [os.path.join(data_dir, n) for n in names],
      [by_name.get(n, 0) for n in names],
  )


def _repeat(items, n):
  return [items[i % len(items)] for i in range(n)]


def _time_elements(iterator, warmup, count, rows=1):
  """Images/s over `count` images after `warmup`, `rows` per element."""
  seen = 0
  for _ in iterator:
    seen += rows
    if seen >= warmup:
      break
  start, timed = time.perf_counter(), 0
  for _ in iterator:
    timed += rows
    if timed >= count:
      break
  return timed / (time.perf_counter() - start)


def main(argv):
  del argv
  if not FLAGS.data_dir or not os.path.isdir(FLAGS.data_dir):
    sys.exit(f'error: --data_dir={FLAGS.data_dir!r} is not a directory.')
  tf = input_pipeline._import_tf()  # pylint: disable=protected-access
  paths, labels = _file_list(FLAGS.data_dir, FLAGS.class_folders)
  if not paths:
    sys.exit(
        f'error: no .jpeg, .jpg or .png files in {FLAGS.data_dir} '
        f'(for class subfolders add --class_folders).'
    )
  total = FLAGS.warmup_images + FLAGS.num_images
  all_paths, all_labels = _repeat(paths, total), _repeat(labels, total)
  cfg = ConfigDict(
      dict(
          image_size=FLAGS.image_size,
          resize_method=FLAGS.resize_method,
          antialias=FLAGS.antialias,
      )
  )
  prep = input_pipeline.Preprocessing.from_config(cfg)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  autotune = tf.data.AUTOTUNE
  mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 2**20
  print(
      f'{len(paths)} files ({mb:.3f} MiB each on average) repeated to '
      f'{total}; {os.cpu_count()} CPUs; image_size {FLAGS.image_size}, '
      f'{FLAGS.resize_method}, antialias={FLAGS.antialias}'
  )

  def report(stage, rate):
    print(f'{stage:<16} {rate:9.1f} images/s', flush=True)

  files = tf.data.Dataset.from_tensor_slices(all_paths)
  read = files.map(tf.io.read_file, num_parallel_calls=autotune)
  if 'read' in FLAGS.stages:
    ds = read.map(tf.strings.length).prefetch(autotune).with_options(options)
    report(
        '1 read',
        _time_elements(iter(ds), FLAGS.warmup_images, FLAGS.num_images),
    )
  if 'train_decode' in FLAGS.stages:
    fn = input_pipeline.make_train_preprocess(prep)
    ds = read.enumerate().map(
        lambda i, data: fn(data, tf.stack([tf.constant(0, tf.int64), i])),
        num_parallel_calls=autotune,
    )
    ds = ds.prefetch(autotune).with_options(options)
    report(
        '2 train decode',
        _time_elements(iter(ds), FLAGS.warmup_images, FLAGS.num_images),
    )
  if {'train_batches', 'eval_batches'} & set(FLAGS.stages):
    bs = FLAGS.batch_size
    dataset = input_pipeline.from_file_lists(
        _repeat(paths, 2 * total),
        _repeat(labels, 2 * total),
        all_paths,
        all_labels,
        1000,
        cfg,
        process_index=0,
        process_count=1,
    )
    if 'train_batches' in FLAGS.stages:
      report(
          f'3 train batch{bs}',
          _time_elements(
              dataset.train_batches(bs, seed=0),
              FLAGS.warmup_images,
              FLAGS.num_images,
              rows=bs,
          ),
      )
    if 'eval_batches' in FLAGS.stages:
      report(
          f'3 eval batch{bs}',
          _time_elements(
              dataset.eval_batches(bs),
              FLAGS.warmup_images,
              FLAGS.num_images - bs,
              rows=bs,
          ),
      )


if __name__ == '__main__':
  app.run(main)
