"""Writes a tiny prepared TFDS `imagenet2012` (version and features of the
real builder) into a data_dir, as a user's TPU VM would have it."""

import io

import numpy as np
from PIL import Image


def build(
    root: str,
    num_train: int = 16,
    num_val: int = 6,
    num_classes: int = 4,
    seed: int = 0,
) -> str:
  """Prepares `root/imagenet2012/<version>/` and returns `root`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)

  def jpeg(label):
    h, w = rng.integers(40, 72, 2)
    pixels = np.clip(label * 60 + rng.integers(0, 40, (h, w, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format='JPEG')
    return buf.getvalue()

  examples = {
      split: [
          (int(label), jpeg(label)) for label in rng.integers(0, num_classes, n)
      ]
      for split, n in (('train', num_train), ('validation', num_val))
  }
  real = tfds.builder_cls('imagenet2012')

  class TinyImagenet2012(
      tfds.core.GeneratorBasedBuilder, skip_registration=True
  ):
    """Same name, version and features as TFDS's imagenet2012."""

    name = 'imagenet2012'
    VERSION = real.VERSION

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict(
              {
                  'image': tfds.features.Image(encoding_format='jpeg'),
                  'label': tfds.features.ClassLabel(num_classes=1000),
                  'file_name': tfds.features.Text(),
              }
          ),
          supervised_keys=('image', 'label'),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in examples}

    def _generate_examples(self, split):
      for i, (label, data) in enumerate(examples[split]):
        yield f'{split}_{i}', {
            'image': io.BytesIO(data),
            'label': label,
            'file_name': f'{split}_{i}.JPEG',
        }

  # See test_input_pipeline.py: a one-part module name keeps TFDS from
  # needing importlib_resources to locate the builder's code.
  TinyImagenet2012.__module__ = 'tiny_imagenet2012'
  TinyImagenet2012(data_dir=root).download_and_prepare()
  return root
