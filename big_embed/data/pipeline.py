"""Grain input pipelines: the mixed, captioned, tokenized training stream and the evaluation sets.

Training: each source is sharded by process, shuffled, decoded, randomly captioned (a seeded
`random_map`, deterministic per element and epoch) and repeated forever; the sources are mixed by
weight, batched and tokenized. Iterators support exact `get_state()` / `set_state()` and
`grain.checkpoint.CheckpointSave/CheckpointRestore`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from big_embed.data import captions, fashion_mnist, image_ops, sources
from big_embed.data.tokenizer import Tokenizer

PROMPT_TEMPLATES = captions.PROMPT_TEMPLATES


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields `make_train_dataset` reads, with their defaults."""
  return ml_collections.ConfigDict(dict(
      data_dir="",  # "" = $BIG_EMBED_DATA_DIR or ~/.cache/big_embed/datasets
      mixture={"emoji": 0.5, "fashion_mnist": 0.5},  # dataset -> sampling weight
      max_text_len=16,
      worker_count=0,  # > 0: Grain worker processes (needs absl flags parsed, ~8 s to start)
      num_threads=4,  # threads reading batches in each process
      prefetch_buffer_size=8,  # batches
      mismatched_fraction=0.0,  # > 0: swap this share of captions within each batch and add "score" (see below)
  ))


def _seed(seed: int, *parts: str) -> int:
  """A 32-bit seed derived from `seed` and a stream name (stable across runs and machines)."""
  digest = hashlib.sha1(repr((int(seed),) + parts).encode()).digest()
  return int.from_bytes(digest[:4], "big")


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def emoji_class_id(emoji_id: str) -> int:
  """A stable id >= 16 per emoji, disjoint from the Fashion-MNIST classes 0..9."""
  return 16 + int.from_bytes(hashlib.sha1(emoji_id.encode("utf-8")).digest()[:4], "big") % (2**31 - 16)


# Decoders: TFDS record -> {"image": uint8 [S, S, 3], "ids": int, ...fields the captioner needs}.
# `ids` names what an example shows: examples with equal ids are positives of each other (all Fashion-MNIST
# images of one class; one emoji), which losses with duplicate-id masks or multiple positives read.
def _decode_emoji(record: dict[str, Any], image_size: int) -> dict[str, Any]:
  return {"image": image_ops.to_rgb(record["image"], image_size),
          "ids": emoji_class_id(_text(record["id"])),
          "name": _text(record["name"]),
          "keywords": tuple(_text(k) for k in record["keywords"])}


def _decode_fashion_mnist(record: dict[str, Any], image_size: int) -> dict[str, Any]:
  label = int(record["label"])
  return {"image": image_ops.to_rgb(record["image"], image_size), "ids": label, "label": label}


# Captioners: decoded element, rng -> {"image": uint8 [S, S, 3], "text": str, "ids": int}.
def _caption_emoji(element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  return {"image": element["image"], "ids": element["ids"],
          "text": captions.emoji_caption(element["name"], element["keywords"], rng)}


def _caption_fashion_mnist(element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
  return {"image": element["image"], "ids": element["ids"],
          "text": captions.fashion_caption(element["label"], rng)}


_DECODERS = {"emoji": _decode_emoji, "fashion_mnist": _decode_fashion_mnist}
_CAPTIONERS = {"emoji": _caption_emoji, "fashion_mnist": _caption_fashion_mnist}


def _mismatch_captions(batch: dict[str, np.ndarray], rng: np.random.Generator, fraction: float
                       ) -> dict[str, np.ndarray]:
  """Image-text matching pairs: a `fraction` of rows get another row's caption (a cyclic shift among them).

  Adds "score": float32 [B], 1 where the caption shows the image (same ids) and 0 elsewhere, for pair losses
  such as CoSENT. "ids" stay the image's.
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


def _source_dataset(name: str, data_dir: str, *, image_size: int, seed: int, process_index: int,
                    process_count: int) -> grain.MapDataset:
  """Infinite stream of one dataset's training examples {"image", "text": str} for this process."""
  ds = grain.MapDataset.source(sources.open_split(name, data_dir, "train"))
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=_seed(seed, name, "shuffle"))
  ds = ds.map(functools.partial(_DECODERS[name], image_size=image_size))
  ds = ds.random_map(_CAPTIONERS[name], seed=_seed(seed, name, "caption"))
  return ds.repeat(None)  # Reseeds shuffle and captions every epoch.


def _mixture(data_config: ml_collections.ConfigDict) -> dict[str, float]:
  mixture = {str(k): float(v) for k, v in dict(data_config.get("mixture", {})).items() if v > 0}
  unknown = sorted(set(mixture) - set(_DECODERS))
  if unknown or not mixture:
    raise ValueError(f"config.data.mixture must give positive weights to some of {sorted(_DECODERS)}"
                     f"; got {dict(data_config.get('mixture', {}))}")
  return mixture


def make_train_dataset(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       batch_size: int, image_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """The training stream of this process.

  Args:
    data_config: `data_dir`, `mixture`, `max_text_len`, `worker_count` (see `default_data_config`).
    tokenizer: encodes the captions.
    batch_size: per-process batch size B.
    image_size: output image side S.
    seed: fixes the order, the mixture and the captions.
    process_index, process_count: this process reads records process_index::process_count.

  Returns:
    An infinite `grain.IterDataset` of {"image": uint8 [B, S, S, 3], "text": int32 [B, L], "ids": int32 [B]} numpy
    batches (L = max_text_len). `iter(ds)` has exact `get_state()` / `set_state()`.

  Raises:
    DataError: a dataset of the mixture is not prepared (or corrupt).
  """
  defaults = default_data_config()
  get = lambda key: data_config.get(key, defaults[key])  # pylint: disable=unnecessary-lambda-assignment
  data_dir = get("data_dir") or None
  mixture = _mixture(data_config)
  parts = [_source_dataset(name, data_dir, image_size=image_size, seed=seed,
                           process_index=process_index, process_count=process_count)
           for name in mixture]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=list(mixture.values()))
  ds = ds.batch(batch_size, drop_remainder=True)
  fraction = float(get("mismatched_fraction"))
  if not 0 <= fraction <= 1:
    raise ValueError(f"config.data.mismatched_fraction must be in [0, 1], got {fraction}")
  if fraction > 0:
    ds = ds.random_map(functools.partial(_mismatch_captions, fraction=fraction), seed=_seed(seed, "mismatch"))
  ds = ds.map(functools.partial(_tokenize, tokenizer=tokenizer, max_len=int(get("max_text_len"))))
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(get("num_threads")),
                                             prefetch_buffer_size=int(get("prefetch_buffer_size"))))
  if int(get("worker_count")) > 0:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(get("worker_count"))))
  return ids


def load_zero_shot_set(data_dir: str | os.PathLike[str] | None, *, image_size: int,
                       split: str = "test") -> dict[str, Any]:
  """Fashion-MNIST for zero-shot classification.

  Returns:
    {"images": uint8 [N, S, S, 3], "labels": int32 [N], "class_names": list[str] of natural names
    ("t-shirt", ..., "ankle boot") to fill `PROMPT_TEMPLATES` with}.
  """
  records = sources.read_all("fashion_mnist", data_dir, split)
  images = np.stack([r["image"] for r in records])  # [N, 28, 28]
  return {"images": image_ops.batch_to_rgb(images, image_size),
          "labels": np.fromiter((r["label"] for r in records), np.int32, len(records)),
          "class_names": list(fashion_mnist.PROMPT_NAMES)}


def load_retrieval_set(data_dir: str | os.PathLike[str] | None, *, image_size: int,
                       split: str = "test") -> dict[str, Any]:
  """Emoji image <-> caption pairs for retrieval (caption = the CLDR name).

  Returns:
    {"images": uint8 [N, S, S, 3], "captions": list[str] (N), "ids": list[str] (N, the emoji)}.
  """
  records = sources.read_all("emoji", data_dir, split)
  images = np.stack([r["image"] for r in records])  # [N, 64, 64, 3]
  return {"images": image_ops.batch_to_rgb(images, image_size),
          "captions": [_text(r["name"]) for r in records],
          "ids": [_text(r["id"]) for r in records]}
