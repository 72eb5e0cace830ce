"""Ranking (retrieval) metrics in NumPy: recall, hit rate, MRR, MAP, nDCG with graded gains, multi-label precision.

Conventions shared by every metric here:
  * `scores` is [Q, N] (higher = more similar), one row per query, one column per gallery item.
  * `relevant` gives each query's relevant columns, as one of
      - a bool mask [Q, N];
      - Q iterables of column indices in [0, N) (binary relevance: gain 1 each);
      - Q mappings {column: gain} (graded relevance, e.g. qrels grades; a gain must be finite and >= 0, and a
        column whose gain is 0 is judged not relevant). Only nDCG reads the gains; every other metric counts a
        column with gain > 0 as relevant.
  * Tie rule: a ranking sorts scores in descending order with ties broken by the lower column index (a stable
    sort), so every metric is deterministic. Ranks are 0-based. With this rule a collapsed model (all scores
    equal) scores like a fixed ranking 0, 1, 2, ..., not like a perfect one.
  * A query with no relevant item has no recall, MRR, MAP or nDCG: scoring one raises a ValueError that names it
    (drop such queries first). `k` may exceed N: the whole ranking is then inside the cut-off.
  * The `*_from_ranks` forms take `relevant_ranks(scores, relevant)`, so an evaluator can rank in query chunks and
    compute every metric from one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

_PAIR_CHUNK = 256  # (query, relevant item) pairs ranked at once: bounds memory to _PAIR_CHUNK x N scores


def check_scores(scores, name: str = "scores") -> np.ndarray:
  """`scores` as a 2-D array [Q, N]; ValueError naming `name` if it is not 2-D or holds NaN."""
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"{name} must be 2-D [queries, candidates], got shape {scores.shape}")
  if np.isnan(scores).any():
    raise ValueError(f"{name} contain NaN; check the embeddings")
  return scores


def _graded(i: int, rel: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """(columns, gains) of query i's mapping {column: gain}, sorted by column, gain-0 columns dropped."""
  cols = np.fromiter((int(c) for c in rel), np.int64, len(rel))
  gains = np.fromiter((float(g) for g in rel.values()), np.float64, len(rel))
  if not np.all(np.isfinite(gains)) or (gains < 0).any():
    raise ValueError(f"query {i} has a gain outside [0, inf): {sorted(rel.values())}; gains must be finite and >= 0")
  order = np.argsort(cols, kind="stable")
  keep = gains[order] > 0
  return cols[order][keep], gains[order][keep]


def relevance_gains(relevant, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Each query's relevant columns and their gains, checked against `shape` = (Q, N).

  Args:
    relevant: a bool mask [Q, N], Q iterables of column indices, or Q mappings {column: gain} (module docstring).
    shape: (Q, N) of the scores.
  Returns:
    (columns, gains): Q sorted unique int64 arrays of relevant columns, and Q float64 arrays of their gains in the
    same order (all 1 unless `relevant` gives gains).
  """
  q, n = shape
  if isinstance(relevant, np.ndarray) and relevant.dtype == bool:
    if relevant.shape != (q, n):
      raise ValueError(f"relevance mask has shape {relevant.shape}, expected {(q, n)}")
    cols = [np.flatnonzero(row) for row in relevant]
    return cols, [np.ones(len(c)) for c in cols]
  relevant = list(relevant)
  if len(relevant) != q:
    raise ValueError(f"relevance has {len(relevant)} entries but scores have {q} query rows")
  cols, gains = [], []
  for i, rel in enumerate(relevant):
    if isinstance(rel, Mapping):
      idx, gain = _graded(i, rel)
    else:
      idx = np.unique(np.asarray(list(rel) if not isinstance(rel, np.ndarray) else rel, np.int64).reshape(-1))
      gain = np.ones(len(idx))
    if len(idx) and (idx[0] < 0 or idx[-1] >= n):
      raise ValueError(f"query {i} lists relevant index {idx[0] if idx[0] < 0 else idx[-1]} outside [0, {n})")
    cols.append(idx)
    gains.append(gain)
  return cols, gains


def relevant_lists(relevant, shape: tuple[int, int]) -> list[np.ndarray]:
  """Each query's relevant columns as sorted unique int64 arrays (the first part of `relevance_gains`)."""
  return relevance_gains(relevant, shape)[0]


def relevant_ranks(scores, relevant) -> list[np.ndarray]:
  """0-based rank of every relevant item of every query, under the module's tie rule.

  Args:
    scores: [Q, N] scores.
    relevant: see the module docstring.
  Returns:
    Q int64 arrays; entry q holds the ranks of query q's relevant columns, in increasing column order (the order
    of `relevance_gains`).
  """
  scores = check_scores(scores)
  rel = relevant_lists(relevant, scores.shape)
  qi = np.concatenate([np.full(len(r), i, np.int64) for i, r in enumerate(rel)] + [np.zeros(0, np.int64)])
  di = np.concatenate(rel + [np.zeros(0, np.int64)]) if rel else np.zeros(0, np.int64)
  cols = np.arange(scores.shape[1])
  ranks = np.empty(len(qi), np.int64)
  for start in range(0, len(qi), _PAIR_CHUNK):
    q, d = qi[start:start + _PAIR_CHUNK], di[start:start + _PAIR_CHUNK]
    rows = scores[q]  # [P, N]
    own = rows[np.arange(len(q)), d][:, None]  # [P, 1]
    before = (rows > own) | ((rows == own) & (cols[None, :] < d[:, None]))
    ranks[start:start + _PAIR_CHUNK] = before.sum(axis=1)
  return list(np.split(ranks, np.cumsum([len(r) for r in rel])[:-1])) if rel else []


def _require_relevant(ranks: Sequence[np.ndarray]) -> None:
  if not len(ranks):
    raise ValueError("no queries to score")
  for i, r in enumerate(ranks):
    if not len(r):
      raise ValueError(f"query {i} has no relevant item; drop it before scoring (its metric is undefined)")


def _check_k(k: int) -> int:
  if int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  return int(k)


def _discount(ranks: np.ndarray) -> np.ndarray:
  """The nDCG position discount 1 / log2(rank + 2) of 0-based ranks."""
  return 1.0 / np.log2(np.asarray(ranks, np.float64) + 2.0)


def recall_from_ranks(ranks: Sequence[np.ndarray], k: int) -> float:
  """Per-query recall@k averaged over queries: mean_q |{relevant items of q ranked < k}| / R_q.

  A query with 3 relevant items and 1 of them in the top k adds 1/3. With one relevant item per query this equals
  `hit_rate_from_ranks`.
  """
  k = _check_k(k)
  _require_relevant(ranks)
  return float(np.mean([np.mean(r < k) for r in ranks]))


def hit_rate_from_ranks(ranks: Sequence[np.ndarray], k: int) -> float:
  """Hit rate@k (also called success@k): the share of queries with at least one relevant item ranked < k."""
  k = _check_k(k)
  _require_relevant(ranks)
  return float(np.mean([r.min() < k for r in ranks]))


def mrr_from_ranks(ranks: Sequence[np.ndarray], k: int = 10) -> float:
  """Mean over queries of 1 / (1 + rank of the first relevant item), 0 if it is not in the top k."""
  k = _check_k(k)
  _require_relevant(ranks)
  return float(np.mean([1.0 / (1 + r.min()) if r.min() < k else 0.0 for r in ranks]))


def map_from_ranks(ranks: Sequence[np.ndarray], k: int | None = None) -> float:
  """Mean average precision (MAP), optionally cut at k (trec_eval's map and map_cut).

  For a query with R relevant items at sorted 0-based ranks r_1 < r_2 < ... < r_R, the precision at its i-th
  relevant item is i / (r_i + 1), and
    AP@k = (1 / R) * sum over i with r_i < k of i / (r_i + 1);
  k=None cuts nowhere (the whole ranking). The denominator stays R, so AP@k < 1 when R > k.
  """
  k = None if k is None else _check_k(k)
  _require_relevant(ranks)
  vals = []
  for r in ranks:
    r = np.sort(r)
    hit = np.arange(1, len(r) + 1) / (r + 1.0)  # [R] precision at each relevant item
    vals.append(hit[r < k].sum() / len(r) if k is not None else hit.mean())
  return float(np.mean(vals))


def ndcg_from_ranks(ranks: Sequence[np.ndarray], k: int = 10, gains: Sequence[np.ndarray] | None = None) -> float:
  """Mean over queries of nDCG@k (Järvelin & Kekäläinen, TOIS 2002) with linear gains, as in trec_eval and
  scikit-learn's `ndcg_score`.

  Query q's relevant items have 0-based ranks r_j and gains g_j > 0 (all 1 for binary relevance);
    DCG@k = sum over j with r_j < k of g_j / log2(r_j + 2),
  and the ideal DCG@k places the R_q gains in descending order at ranks 0, 1, ..., min(R_q, k) - 1. The gain is
  linear in the grade; for the exponential form (2^grade - 1) of Burges et al. (ICML 2005) pass
  gains = 2**grade - 1. The two agree for binary relevance.

  Args:
    ranks: `relevant_ranks` of Q queries.
    k: the cut-off.
    gains: None (binary), or Q float arrays aligned with `ranks` (the second part of `relevance_gains`).
  """
  k = _check_k(k)
  _require_relevant(ranks)
  if gains is None:
    gains = [np.ones(len(r)) for r in ranks]
  if len(gains) != len(ranks) or any(len(g) != len(r) for g, r in zip(gains, ranks)):
    raise ValueError("gains must hold one gain per relevant item of every query, aligned with the ranks")
  if any(not np.all(np.asarray(g) > 0) for g in gains):
    raise ValueError("gains of relevant items must be > 0 (drop a judged-not-relevant item, gain 0, from the ranks)")
  vals = []
  for r, g in zip(ranks, gains):
    g = np.asarray(g, np.float64)
    top = r < k
    dcg = np.sum(g[top] * _discount(r[top]))
    ideal_gains = np.sort(g)[::-1][:k]
    vals.append(dcg / np.sum(ideal_gains * _discount(np.arange(len(ideal_gains)))))
  return float(np.mean(vals))


def recall_at_k(scores, relevant, k: int) -> float:
  """Recall@k in [0, 1] (`recall_from_ranks`): per-query share of relevant items in the top k, averaged."""
  return recall_from_ranks(relevant_ranks(scores, relevant), k)


def hit_rate_at_k(scores, relevant, k: int) -> float:
  """Hit rate@k in [0, 1] (`hit_rate_from_ranks`): share of queries with a relevant item in the top k."""
  return hit_rate_from_ranks(relevant_ranks(scores, relevant), k)


def mrr_at_k(scores, relevant, k: int = 10) -> float:
  """MRR@k in [0, 1]: mean reciprocal (1-based) rank of each query's first relevant item, 0 beyond rank k."""
  return mrr_from_ranks(relevant_ranks(scores, relevant), k)


def map_at_k(scores, relevant, k: int | None = None) -> float:
  """MAP in [0, 1], cut at k unless k is None (`map_from_ranks`)."""
  return map_from_ranks(relevant_ranks(scores, relevant), k)


def ndcg_at_k(scores, relevant, k: int = 10) -> float:
  """nDCG@k in [0, 1] with the log2 discount and linear gains (`ndcg_from_ranks`); binary unless `relevant`
  gives gains as mappings {column: gain}."""
  scores = check_scores(scores)
  cols, gains = relevance_gains(relevant, scores.shape)
  return ndcg_from_ranks(relevant_ranks(scores, cols), k, gains)


def precision_at_k(scores, labels, k: int) -> float:
  """Multi-label precision@k in [0, 1]: the mean over queries of |top-k labels ∩ true labels| / k.

  Args:
    scores: [Q, L] query-label scores (ties ranked by lower label index).
    labels: bool [Q, L] or Q iterables of true label indices (an empty set scores 0).
    k: 1 <= k <= L.
  """
  scores = check_scores(scores)
  k = _check_k(k)
  q, num_labels = scores.shape
  if k > num_labels:
    raise ValueError(f"precision@{k} needs at least {k} labels, got {num_labels}")
  if not q:
    raise ValueError("no queries to score")
  mask = np.zeros((q, num_labels), bool)
  for i, idx in enumerate(relevant_lists(labels, scores.shape)):
    mask[i, idx] = True
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k]
  return float(np.mean(np.take_along_axis(mask, top, axis=1).sum(axis=1) / k))
