"""Seeds of the input streams: every random choice of a stream comes from a seed derived from the run's seed and a
name, so that streams are reproducible across runs, machines and processes and independent of each other."""

from __future__ import annotations

import hashlib

import numpy as np


def derive(seed: int, *parts: object) -> int:
  """A 32-bit seed derived from `seed` and a stream name (`parts`, compared as strings)."""
  digest = hashlib.sha1(repr((int(seed),) + tuple(str(p) for p in parts)).encode()).digest()
  return int.from_bytes(digest[:4], "big")


def generator(*seeds: int) -> np.random.Generator:
  """A numpy PCG64 generator seeded by the integers `seeds` (e.g. a derived seed, a batch number, a process)."""
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(s) for s in seeds])))
