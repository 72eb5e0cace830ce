"""The read settings of `config.data` and how a training MapDataset becomes the IterDataset a run iterates.

Both training streams (image-text and text tasks) read `num_threads`, `prefetch_buffer_size` and `worker_count`
here, with the defaults of `big_embed.config_schema.DATA`.
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections

from big_embed import config_schema


def setting(data_config: ml_collections.ConfigDict, key: str) -> Any:
  """`data_config.<key>`, or its default in `config_schema.DATA` when the config does not set it."""
  return data_config.get(key, config_schema.DATA[key].default)


def data_dir(data_config: ml_collections.ConfigDict) -> str | None:
  """`data_config.data_dir`, or None when unset ("" = $BIG_EMBED_DATA_DIR, else the default directory)."""
  return setting(data_config, "data_dir") or None


def to_iter_dataset(ds: grain.MapDataset, data_config: ml_collections.ConfigDict) -> grain.IterDataset:
  """`ds` read with `num_threads` threads and `prefetch_buffer_size` batches ahead, in `worker_count` worker
  processes when > 0. The result's iterator has exact `get_state()` / `set_state()`."""
  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(setting(data_config, "num_threads")),
                                             prefetch_buffer_size=int(setting(data_config, "prefetch_buffer_size"))))
  workers = int(setting(data_config, "worker_count"))
  if workers > 0:
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return out
