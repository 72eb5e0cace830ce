"""Fashion-MNIST (Xiao et al. 2017) from the Debian package `dataset-fashion-mnist`, as a TFDS builder.

Features: `image` uint8 [28, 28] (a raw-bytes `Tensor`, far faster to write and read than PNG),
`label` ClassLabel over `CLASS_NAMES`. Splits: `train` (60,000) and `test` (10,000) as in the IDX
files.

Image-text use: a training image is captioned with a random prompt template filled with its class's natural name
("a photo of a coat."); zero-shot classification ensembles the same templates.
"""

from __future__ import annotations

import gzip
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from big_embed.data import debian
from big_embed.data.corpora import registry
from big_embed.data.errors import DataError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_PACKAGES = (DEBIAN_PACKAGE,)
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
# Natural forms for captions and zero-shot prompts ("a photo of a t-shirt.").
PROMPT_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                "ankle boot")
PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a {}.",
    "an item of clothing: {}.",
)
IMAGE_SHAPE = (28, 28)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: pathlib.Path) -> np.ndarray:
  """Reads an IDX file (gzipped if its name ends with .gz) into an array of its stored shape.

  Raises:
    DataError: the file is not a well-formed IDX file.
  """
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"Cannot read IDX file {path}: {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise DataError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
  ndim = data[3]
  header = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
    raise DataError(f"IDX file {path} is truncated or has trailing bytes (shape {shape})")
  return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _idx_file(stem: str) -> pathlib.Path:
  """Returns the installed path of IDX file `stem` (gzipped or not)."""
  try:
    return debian.package_file(DEBIAN_PACKAGE, f"/{stem}.gz")
  except DataError:
    return debian.package_file(DEBIAN_PACKAGE, f"/{stem}")


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28], labels uint8 [N]) of `split` ("train" or "test")."""
  prefix = _SPLIT_PREFIX[split]
  images = read_idx(_idx_file(f"{prefix}-images-idx3-ubyte"))
  labels = read_idx(_idx_file(f"{prefix}-labels-idx1-ubyte"))
  if images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
    raise DataError(f"Unexpected Fashion-MNIST {split} shapes: images {images.shape}, "
                    f"labels {labels.shape}")
  if labels.max() >= len(CLASS_NAMES):
    raise DataError(f"Fashion-MNIST {split} has a label {labels.max()} >= {len(CLASS_NAMES)}")
  return images, labels


class FashionMnistBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of Fashion-MNIST from local IDX files (no download)."""

  name = "big_embed_fashion_mnist"  # distinct from TFDS's own `fashion_mnist`
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from the Debian package dataset-fashion-mnist."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST: 28x28 grayscale images of 10 kinds of clothing.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(split) for split in _SPLIT_PREFIX}

  def _generate_examples(self, split):
    images, labels = load_split(split)
    for i in range(len(labels)):
      yield i, {"image": images[i], "label": int(labels[i])}


def example(record: dict[str, Any]) -> dict[str, Any]:
  """A record's training example: all images of one class are positives of each other (ids = the class)."""
  label = int(record["label"])
  return {"ids": label, "label": label}


def caption(element: dict[str, Any], rng: np.random.Generator) -> str:
  """A random prompt template filled with the natural name of the example's class."""
  template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
  return template.format(PROMPT_NAMES[element["label"]])


def caption_texts(read_split: Callable[[str], Any]) -> Iterator[str]:
  """Every caption a training example can get (the records are not needed)."""
  del read_split
  for template in PROMPT_TEMPLATES:
    for name in PROMPT_NAMES:
      yield template.format(name)


registry.register(registry.Corpus(
    name="fashion_mnist", builder=FashionMnistBuilder, kind="image", debian_packages=DEBIAN_PACKAGES,
    fields={"image": "image", "label": "class"},
    image_text=registry.ImageText(example=example, caption=caption, caption_texts=caption_texts,
                                  label_field="label", class_names=PROMPT_NAMES, prompt_templates=PROMPT_TEMPLATES)))
