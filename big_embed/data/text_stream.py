"""The multi-task text training stream: task-homogeneous batches (Piccolo2-style), deterministic and exactly resumable.

Every global batch belongs to one task, on every process. The task of global step s is drawn with probabilities
proportional to the tasks' weights from an RNG seeded by (seed, s // SCHEDULE_BLOCK), identically on every process
(`TaskSchedule`), and the batch of step s is batch number k_s = #{s' < s : task(s') = task(s)} of that task's own
stream (`text_batches`). So the batch of step s is a pure function of (seed, tasks, process, s); the training
stream is a MapDataset indexed by step, and its iterator (`to_iter_dataset`) has exact `get_state()` /
`set_state()`, also through `grain.checkpoint.CheckpointSave/CheckpointRestore`. State: {"next_index": s}, the
number of batches read. A restored state replays exactly when the tasks, the seed and the process count are
unchanged (with other tasks the stream simply continues at step s of the new schedule).

Each element is (task type, batch): the type ("retrieval", "sts", "classification" or "multilabel") says what the
batch holds (`text_batches`). The name of step s's task is `list(specs)[schedule(s)[0]]` with
`schedule = TaskSchedule([spec.weight for spec in specs.values()], schedule_seed(seed))`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from big_embed.data import reading, seeds, sources, text_batches, text_records
from big_embed.data.text_tasks import TaskSpec
from big_embed.data.tokenizer import Tokenizer

SCHEDULE_BLOCK = 4096  # steps per RNG block of the task schedule


class TaskSchedule:
  """Global step -> (task index, how many earlier steps had that task); identical on every process.

  Steps are drawn in blocks of SCHEDULE_BLOCK from PCG64(SeedSequence([seed, block])): u ~ U[0, 1), task =
  the first t with u < cdf[t]. Per-block task counts are computed lazily and kept (T int64 per block), the
  blocks themselves only for the last few; thread-safe.
  """

  def __init__(self, weights: Sequence[float], seed: int):
    w = np.asarray(weights, np.float64)
    self._cdf = np.cumsum(w) / w.sum()
    self._seed = int(seed)
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.Lock()
    self._before: list[np.ndarray] = [np.zeros(len(self._cdf), np.int64)]  # task counts before block b
    self._recent: dict[int, np.ndarray] = {}  # the last few blocks, uint16 [SCHEDULE_BLOCK]

  def _draw(self, b: int) -> np.ndarray:
    u = seeds.generator(self._seed, b).random(SCHEDULE_BLOCK)
    return np.minimum(np.searchsorted(self._cdf, u, side="right"), len(self._cdf) - 1).astype(np.uint16)

  def _block(self, b: int) -> np.ndarray:
    """Block b's tasks; extends the counts up to block b first (call with the lock held)."""
    while len(self._before) <= b:
      block = self._draw(len(self._before) - 1)
      self._before.append(self._before[-1] + np.bincount(block, minlength=len(self._cdf)))
    if b not in self._recent:
      if len(self._recent) >= 4:
        self._recent.pop(min(self._recent))
      self._recent[b] = self._draw(b)
    return self._recent[b]

  def __call__(self, step: int) -> tuple[int, int]:
    b, j = divmod(int(step), SCHEDULE_BLOCK)
    with self._lock:
      block, before = self._block(b), self._before[b]
    t = int(block[j])
    return t, int(before[t] + np.count_nonzero(block[:j] == t))

  def __getstate__(self):
    return {"_cdf": self._cdf, "_seed": self._seed}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()


class _StepDataset(grain.MapDataset):
  """Infinite MapDataset: element s = (task type, process-local batch of global step s)."""

  def __init__(self, tasks: list[text_batches.TaskBatches], schedule: TaskSchedule, process_index: int):
    super().__init__()
    self._tasks, self._schedule, self._process_index = tasks, schedule, process_index

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    t, k = self._schedule(index)
    task = self._tasks[t]
    return task.spec.type, task.batch(k, self._process_index)

  def __str__(self) -> str:
    return f"TextTaskStepDataset(tasks={[t.name for t in self._tasks]}, process={self._process_index})"


def schedule_seed(seed: int) -> int:
  """The seed of the task schedule of a run with seed `seed`."""
  return seeds.derive(seed, "schedule")


def make_text_train_dataset(specs: Mapping[str, TaskSpec], data_config: ml_collections.ConfigDict,
                            tokenizer: Tokenizer, *, max_text_len: int, query_prefix: str, doc_prefix: str,
                            seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The multi-task text training stream of this process.

  Args:
    specs: name -> TaskSpec, as `text_tasks.validate_tasks` returns them (checked there, not again here).
    data_config: `config.data`: `data_dir`, `num_threads`, `prefetch_buffer_size`, `worker_count`.
    tokenizer: encodes every text.
    max_text_len: L, tokens per text (config.model.max_text_len).
    query_prefix, doc_prefix: put before query-side and document-side texts (`text_batches`).
    seed: fixes the task schedule, the record order and every sampled negative / label.
    process_index, process_count: this process reads shard process_index::process_count of every task and
      yields its share (batch_size // process_count rows) of each global batch.

  Returns:
    An infinite `grain.IterDataset` of (task type, batch dict) -- the batch of one task, layouts in
    `text_batches`. `iter(ds)` has exact `get_state()` / `set_state()` (state {"next_index": batches read}).

  Raises:
    ConfigError: a task has too few usable records for its process-local batch, or a Text label too few labels.
    DataError: a dataset or mined set is missing or does not match its task.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  data_dir = reading.data_dir(data_config)
  reader = text_records.ColumnReader(data_dir)
  tasks = [text_batches.open_task(spec, reader, sources.features(spec.dataset, data_dir), data_dir,
                                  tokenizer=tokenizer, max_len=max_text_len, query_prefix=query_prefix,
                                  doc_prefix=doc_prefix, seed=seed, process_count=process_count)
           for spec in specs.values()]
  schedule = TaskSchedule([t.spec.weight for t in tasks], schedule_seed(seed))
  return reading.to_iter_dataset(_StepDataset(tasks, schedule, process_index), data_config)
