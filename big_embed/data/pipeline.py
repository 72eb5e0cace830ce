"""Grain input pipelines of image-text models: the mixed, captioned, tokenized training stream and the evaluation sets.

Training: each image corpus of `config.data.mixture` is sharded by process, shuffled, decoded, randomly captioned
(a seeded `random_map`, deterministic per element and epoch; the corpus's `ImageText` says how) and repeated
forever; the corpora are mixed by weight, batched and tokenized. Iterators support exact `get_state()` /
`set_state()` and `grain.checkpoint.CheckpointSave/CheckpointRestore`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np

from big_embed.data import corpora, image_ops, reading, seeds, sources
from big_embed.data.text_corpus import to_str
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError


def _image_text(name: str, data_dir: str | os.PathLike[str] | None) -> corpora.ImageText:
  corpus = sources.corpus(name, data_dir)
  if corpus.image_text is None:
    raise ConfigError(f"dataset {name!r} is a text corpus, not an image-text one; image corpora: "
                      f"{', '.join(sources.names('image', data_dir))}")
  return corpus.image_text


# Decoded element: {"image": uint8 [S, S, 3], "ids": int, ...what the corpus's caption reads}; examples with equal
# ids show the same thing (positives of each other), which losses with duplicate-id masks or multiple positives read.
def _decode(record: dict[str, Any], *, spec: corpora.ImageText, image_size: int) -> dict[str, Any]:
  return {"image": image_ops.to_rgb(record[spec.image_field], image_size), **spec.example(record)}


def _caption(element: dict[str, Any], rng: np.random.Generator, *, spec: corpora.ImageText) -> dict[str, Any]:
  """{"image": uint8 [S, S, 3], "text": str, "ids": int}."""
  return {"image": element["image"], "ids": element["ids"], "text": spec.caption(element, rng)}


def _mismatch_captions(batch: dict[str, np.ndarray], rng: np.random.Generator, fraction: float
                       ) -> dict[str, np.ndarray]:
  """Image-text matching pairs: a `fraction` of rows get another row's caption (a cyclic shift among them).

  Adds "score": float32 [B], 1 where the caption shows the image (same ids) and 0 elsewhere, for pair losses.
  "ids" stay the image's.
  """
  n = len(batch["text"])
  rows = rng.choice(n, size=max(2, int(round(fraction * n))), replace=False)
  text = np.array(batch["text"], dtype=object)
  text_ids = np.array(batch["ids"])
  text[rows], text_ids[rows] = text[np.roll(rows, 1)], text_ids[np.roll(rows, 1)]
  return {**batch, "text": list(text), "score": (text_ids == np.asarray(batch["ids"])).astype(np.float32)}


def _tokenize(batch: dict[str, np.ndarray], tokenizer: Tokenizer, max_len: int
              ) -> dict[str, np.ndarray]:
  """{"text": str [B], "ids", ...} -> {"text": int32 [B, max_len], "ids": int32 [B], ...}."""
  return {**batch, "text": tokenizer.encode_batch(list(batch["text"]), max_len),
          "ids": np.asarray(batch["ids"], np.int32)}


def _source_dataset(name: str, data_dir: str | None, *, image_size: int, seed: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """Infinite stream of one corpus's training examples {"image", "text": str, "ids"} for this process."""
  spec = _image_text(name, data_dir)  # resolved here: worker processes need no registry lookup
  ds = grain.MapDataset.source(sources.open_split(name, data_dir, "train"))
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seeds.derive(seed, name, "shuffle"))
  ds = ds.map(functools.partial(_decode, spec=spec, image_size=image_size))
  ds = ds.random_map(functools.partial(_caption, spec=spec), seed=seeds.derive(seed, name, "caption"))
  return ds.repeat(None)  # Reseeds shuffle and captions every epoch.


def _mixture(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  given = dict(reading.setting(data_config, "mixture"))
  mixture = {str(k): float(v) for k, v in given.items() if v > 0}
  image = sources.names("image", reading.data_dir(data_config))
  if not mixture or set(mixture) - set(image):
    raise ConfigError(f"config.data.mixture must give positive weights to some of {list(image)}; got {given}")
  return mixture


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ConfigError(f"config.train.batch_size={batch_size} is not divisible by the {process_count} processes; "
                      f"use a positive multiple of {process_count}")
  return batch_size // process_count


def make_train_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *, batch_size: int,
                       max_text_len: int, image_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The image-text training stream of this process.

  Args:
    data_config: `config.data`: `data_dir`, `mixture` (image corpus -> weight), `mismatched_fraction`,
      `num_threads`, `prefetch_buffer_size`, `worker_count` (defaults: `config_schema.DATA`).
    tokenizer: encodes the captions.
    batch_size: the global batch size (config.train.batch_size); each process yields B = batch_size //
      process_count rows.
    max_text_len: L, tokens per caption (config.model.max_text_len).
    image_size: output image side S.
    seed: fixes the order, the mixture and the captions.
    process_index, process_count: this process reads records process_index::process_count.

  Returns:
    An infinite `grain.IterDataset` of {"image": uint8 [B, S, S, 3], "text": int32 [B, L], "ids": int32 [B]} numpy
    batches (with "score" float32 [B] when mismatched_fraction > 0). `iter(ds)` has exact `get_state()` /
    `set_state()`.

  Raises:
    ConfigError: a batch size the processes do not divide; a mixture without image corpora; a mismatched
      fraction outside [0, 1].
    DataError: a dataset of the mixture is not prepared (or corrupt).
  """
  local_batch = _local_batch(int(batch_size), process_count)
  data_dir = reading.data_dir(data_config)
  mixture = _mixture(data_config)
  fraction = float(reading.setting(data_config, "mismatched_fraction"))
  if not 0 <= fraction <= 1:
    raise ConfigError(f"config.data.mismatched_fraction must be in [0, 1], got {fraction}")
  parts = [_source_dataset(name, data_dir, image_size=image_size, seed=seed,
                           process_index=process_index, process_count=process_count)
           for name in mixture]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=list(mixture.values()))
  ds = ds.batch(local_batch, drop_remainder=True)
  if fraction > 0:
    ds = ds.random_map(functools.partial(_mismatch_captions, fraction=fraction), seed=seeds.derive(seed, "mismatch"))
  ds = ds.map(functools.partial(_tokenize, tokenizer=tokenizer, max_len=int(max_text_len)))
  return reading.to_iter_dataset(ds, data_config)


def _read(name: str, data_dir: str | os.PathLike[str] | None, split: str, needs: Callable[[corpora.ImageText], str],
          what: str) -> tuple[corpora.ImageText, list[dict[str, Any]]]:
  spec = _image_text(name, data_dir)
  if not needs(spec):
    raise ConfigError(f"dataset {name!r} has no {what}; datasets with one: "
                      f"{', '.join(c.name for c in sources.entries('image', data_dir) if needs(c.image_text))}")
  return spec, sources.read_all(name, data_dir, split)


def load_zero_shot_set(name: str, data_dir: str | os.PathLike[str] | None, *, image_size: int,
                       split: str = "test") -> dict[str, Any]:
  """A labelled image corpus (e.g. Fashion-MNIST) for zero-shot classification.

  Returns:
    {"images": uint8 [N, S, S, 3], "labels": int32 [N], "class_names": list[str] of natural names to fill the
    templates with ("t-shirt", ..., "ankle boot"), "templates": list[str] of prompt templates ("a photo of a {}.")}.

  Raises:
    ConfigError: `name` is not an image corpus with zero-shot classes.
    DataError: the split is not prepared (or corrupt).
  """
  spec, records = _read(name, data_dir, split, lambda s: s.label_field, "zero-shot classes")
  return {"images": image_ops.batch_to_rgb([r[spec.image_field] for r in records], image_size),
          "labels": np.fromiter((r[spec.label_field] for r in records), np.int32, len(records)),
          "class_names": list(spec.class_names), "templates": list(spec.prompt_templates)}


def load_retrieval_set(name: str, data_dir: str | os.PathLike[str] | None, *, image_size: int,
                       split: str = "test") -> dict[str, Any]:
  """Image <-> caption pairs of an image corpus (e.g. emoji: the CLDR name) for retrieval.

  Returns:
    {"images": uint8 [N, S, S, 3], "captions": list[str] (N), "ids": list[str] (N, what each image shows)}.

  Raises:
    ConfigError: `name` is not an image corpus with retrieval captions.
    DataError: the split is not prepared (or corrupt).
  """
  spec, records = _read(name, data_dir, split, lambda s: s.caption_field, "retrieval captions")
  return {"images": image_ops.batch_to_rgb([r[spec.image_field] for r in records], image_size),
          "captions": [to_str(r[spec.caption_field]) for r in records],
          "ids": [to_str(r[spec.id_field]) for r in records]}
