"""Correlation of two score lists (STS evaluation): Pearson, and Spearman with ties given their average rank."""

from __future__ import annotations

import numpy as np


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must be 1-D of the same length; got shapes {x.shape} and {y.shape}")
  if len(x) < 2:
    raise ValueError(f"a correlation needs at least 2 pairs, got {len(x)}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("x and y must be finite (found NaN or inf)")
  return x, y


def average_ranks(x) -> np.ndarray:
  """1-based ranks of the 1-D array `x` [N], tied values sharing the mean of their ranks. Returns float64 [N]."""
  x = np.asarray(x)
  n = len(x)
  order = np.argsort(x, kind="stable")
  xs = x[order]
  starts = np.r_[True, xs[1:] != xs[:-1]]  # first element of each group of equal values
  group = np.cumsum(starts) - 1  # [N] group of each sorted element
  first = np.flatnonzero(starts)
  counts = np.diff(np.r_[first, n])
  mean_rank = first + (counts + 1) / 2.0  # 1-based mean rank of each group
  ranks = np.empty(n, np.float64)
  ranks[order] = mean_rank[group]
  return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  dx, dy = x - x.mean(), y - y.mean()
  denom = np.sqrt(np.dot(dx, dx) * np.dot(dy, dy))
  if denom == 0:
    return float("nan")
  return float(np.clip(np.dot(dx, dy) / denom, -1.0, 1.0))


def pearson(x, y) -> float:
  """Pearson correlation of two 1-D arrays [N] (N >= 2), in [-1, 1]; NaN when either is constant."""
  return _pearson(*_paired(x, y))


def spearman(x, y) -> float:
  """Spearman rank correlation of two 1-D arrays [N] (N >= 2), in [-1, 1]: Pearson's r of the ranks, ties given
  their average rank. NaN when either is constant."""
  x, y = _paired(x, y)
  return _pearson(average_ranks(x), average_ranks(y))
