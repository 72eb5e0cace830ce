"""Pure NumPy metrics for text-embedding evaluation: correlation, ranking, multi-label, mSD, linear probe.

Conventions shared by the ranking metrics:
  * `scores` is [Q, N] (higher = more similar); `relevant` gives each query's relevant column indices, either as
    a sequence of Q iterables of ints or as a bool mask [Q, N].
  * Rankings sort scores in descending order with ties broken by the lower column index (a stable sort), so every
    metric is deterministic; ranks are 0-based.
  * Every metric is in [0, 1], except the correlations (in [-1, 1]) and mSD (0-100, as in its paper).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MSD_MODES = ("sorted", "release")
_PAIR_CHUNK = 256  # (query, relevant doc) pairs ranked at once: bounds memory to _PAIR_CHUNK x N scores


# ----------------------------------------------------------------------------------------------------------------
# Correlation.


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


# ----------------------------------------------------------------------------------------------------------------
# Ranking (retrieval) metrics.


def _check_scores(scores, name: str = "scores") -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"{name} must be 2-D [queries, candidates], got shape {scores.shape}")
  if np.isnan(scores).any():
    raise ValueError(f"{name} contain NaN; check the embeddings")
  return scores


def relevant_lists(relevant, shape: tuple[int, int]) -> list[np.ndarray]:
  """Each query's relevant column indices as sorted unique int64 arrays, checked against `shape` = (Q, N).

  `relevant` is a bool mask [Q, N] or a sequence of Q iterables of column indices in [0, N).
  """
  q, n = shape
  if isinstance(relevant, np.ndarray) and relevant.dtype == bool:
    if relevant.shape != (q, n):
      raise ValueError(f"relevance mask has shape {relevant.shape}, expected {(q, n)}")
    return [np.flatnonzero(row) for row in relevant]
  relevant = list(relevant)
  if len(relevant) != q:
    raise ValueError(f"relevance has {len(relevant)} entries but scores have {q} query rows")
  out = []
  for i, rel in enumerate(relevant):
    idx = np.unique(np.asarray(list(rel) if not isinstance(rel, np.ndarray) else rel, np.int64).reshape(-1))
    if len(idx) and (idx[0] < 0 or idx[-1] >= n):
      raise ValueError(f"query {i} lists relevant index {idx[0] if idx[0] < 0 else idx[-1]} outside [0, {n})")
    out.append(idx)
  return out


def relevant_ranks(scores, relevant) -> list[np.ndarray]:
  """0-based rank of every relevant item of every query.

  Args:
    scores: [Q, N] scores (higher ranks first; ties ranked by lower column index, as a stable sort would).
    relevant: bool mask [Q, N] or Q iterables of relevant column indices.
  Returns:
    Q int64 arrays; entry q holds the ranks of query q's relevant columns (in increasing column order).
  """
  scores = _check_scores(scores)
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


def recall_from_ranks(ranks: Sequence[np.ndarray], k: int) -> float:
  """Mean over queries of (relevant items ranked in the top k) / (relevant items); see `relevant_ranks`."""
  k = _check_k(k)
  _require_relevant(ranks)
  return float(np.mean([np.mean(r < k) for r in ranks]))


def mrr_from_ranks(ranks: Sequence[np.ndarray], k: int = 10) -> float:
  """Mean over queries of 1 / (1 + rank of the first relevant item), 0 if it is not in the top k."""
  k = _check_k(k)
  _require_relevant(ranks)
  return float(np.mean([1.0 / (1 + r.min()) if r.min() < k else 0.0 for r in ranks]))


def ndcg_from_ranks(ranks: Sequence[np.ndarray], k: int = 10) -> float:
  """Mean over queries of binary-relevance nDCG@k.

  DCG@k = sum over relevant items at 0-based rank r < k of 1 / log2(r + 2); the ideal DCG puts the query's R
  relevant items first: sum_{i < min(R, k)} 1 / log2(i + 2).
  """
  k = _check_k(k)
  _require_relevant(ranks)
  discount = 1.0 / np.log2(np.arange(k) + 2.0)  # [k]
  vals = []
  for r in ranks:
    dcg = discount[r[r < k]].sum()
    ideal = discount[:min(len(r), k)].sum()
    vals.append(dcg / ideal)
  return float(np.mean(vals))


def recall_at_k(scores, relevant, k: int) -> float:
  """Recall@k in [0, 1]: the mean over queries of the fraction of their relevant items ranked in the top k
  (with one relevant item per query: the fraction of queries whose item is in the top k).

  Args:
    scores: [Q, N]; relevant: bool [Q, N] or Q iterables of column indices, each non-empty.
  """
  return recall_from_ranks(relevant_ranks(scores, relevant), k)


def mrr_at_k(scores, relevant, k: int = 10) -> float:
  """MRR@k in [0, 1]: mean reciprocal (1-based) rank of each query's first relevant item, 0 beyond rank k."""
  return mrr_from_ranks(relevant_ranks(scores, relevant), k)


def ndcg_at_k(scores, relevant, k: int = 10) -> float:
  """nDCG@k in [0, 1] with binary relevance and the log2 discount (see `ndcg_from_ranks`)."""
  return ndcg_from_ranks(relevant_ranks(scores, relevant), k)


def precision_at_k(scores, labels, k: int) -> float:
  """Multi-label precision@k in [0, 1]: the mean over queries of |top-k labels ∩ true labels| / k.

  Args:
    scores: [Q, L] query-label scores (ties ranked by lower label index).
    labels: bool [Q, L] or Q iterables of true label indices (an empty set scores 0).
    k: 1 <= k <= L.
  """
  scores = _check_scores(scores)
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


# ----------------------------------------------------------------------------------------------------------------
# mSD (UFineBench, Zuo et al., CVPR 2024, arXiv 2312.03441).


class MSDResult(NamedTuple):
  """mSD (0-100) over `num_queries` scored queries; queries with no relevant / only relevant items are dropped."""

  msd: float
  num_queries: int
  dropped_no_relevant: int
  dropped_all_relevant: int


def msd_per_query(sim, query_ids, gallery_ids, mode: str = "sorted") -> tuple[np.ndarray, np.ndarray]:
  """Per-query similarity distance SD_q in [0, 1] (before the x100 of mSD) and relevant counts R_q.

  For query q with cosine similarities s_j in [-1, 1] to the N gallery items: s'_j = (s_j + 1) / 2; π = the
  gallery sorted by s' descending (stable); rel_r = 1[id(π(r)) == id(q)], R = Σ rel; μ+ / μ- = mean s' over the
  relevant / non-relevant items; ρ = 1 - exp(-μ+ / μ-);
    SD_q = ρ · (1/R) Σ_{r: rel_r = 1} [Σ_{u<=r} rel_u s'_π(u) / Σ_{u<=r} s'_π(u)].

  mode="sorted" computes exactly this. mode="release" reproduces the authors' released implementation, which
  applies the rank-ordered relevance vector rel to the similarities in gallery order: with p_j = s'_j · rel_j
  (j used both as a gallery index and as a rank), μ+ = Σ p / R, μ- = (Σ s' - Σ p) / (N - R), and the running
  sums Σ_{u<=r} p_u / Σ_{u<=r} s'_u are taken in gallery order. The two agree when each row of `sim` is already
  in descending order; unlike "sorted", the "release" value changes when the gallery columns are permuted.

  A running-sum ratio of 0 / 0 (leading similarities of exactly -1) counts as 0.

  Args:
    sim: [Q, N] cosine similarities.
    query_ids: [Q] identity of each query; gallery_ids: [N] identity of each gallery item.
    mode: "sorted" or "release".
  Returns:
    (sd [Q] float64, NaN where R = 0 or R = N; num_relevant [Q] int64).
  """
  if mode not in MSD_MODES:
    raise ValueError(f"msd mode must be one of {MSD_MODES}, got {mode!r}")
  sim = _check_scores(sim, "sim").astype(np.float64)
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  q, n = sim.shape
  if query_ids.shape != (q,) or gallery_ids.shape != (n,):
    raise ValueError(f"query_ids must be [{q}] and gallery_ids [{n}] to match sim {sim.shape}; got "
                     f"{query_ids.shape} and {gallery_ids.shape}")
  if sim.size and (sim.min() < -1.001 or sim.max() > 1.001):
    raise ValueError(f"mSD expects cosine similarities in [-1, 1]; got values in [{sim.min():.4g}, "
                     f"{sim.max():.4g}] (normalise the embeddings)")
  s = np.clip(sim, -1.0, 1.0) / 2 + 0.5  # [Q, N] s', gallery order
  order = np.argsort(-s, axis=1, kind="stable")  # [Q, N] π
  rel = (gallery_ids[order] == query_ids[:, None]).astype(np.float64)  # [Q, N] rel_r, rank order
  num_rel = rel.sum(axis=1)
  base = np.take_along_axis(s, order, axis=1) if mode == "sorted" else s  # s' summed in this order
  pos = base * rel  # [Q, N]
  with np.errstate(divide="ignore", invalid="ignore"):
    mean_pos = pos.sum(axis=1) / num_rel
    mean_neg = (base.sum(axis=1) - pos.sum(axis=1)) / (n - num_rel)
    rho = 1.0 - np.exp(-mean_pos / mean_neg)
    num, den = np.cumsum(pos, axis=1), np.cumsum(base, axis=1)
    ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    sd = rho * (ratio * rel).sum(axis=1) / num_rel
  sd[(num_rel == 0) | (num_rel == n)] = np.nan
  return sd, num_rel.astype(np.int64)


def msd_summary(sd: np.ndarray, num_rel: np.ndarray, num_gallery: int) -> MSDResult:
  """Aggregates `msd_per_query` outputs: mSD = 100 · mean SD over queries with 0 < R < N."""
  keep = (num_rel > 0) & (num_rel < num_gallery)
  if not keep.any():
    raise ValueError("mSD is undefined: no query has both relevant and non-relevant gallery items")
  return MSDResult(float(100.0 * np.mean(sd[keep])), int(keep.sum()), int((num_rel == 0).sum()),
                   int((num_rel == num_gallery).sum()))


def msd(sim, query_ids, gallery_ids, mode: str = "sorted") -> MSDResult:
  """Mean similarity distance mSD on a 0-100 scale (UFineBench, arXiv 2312.03441); see `msd_per_query`.

  Queries with no relevant gallery item (R = 0) or only relevant ones (R = N) are dropped; the result says how
  many. Higher is better: relevant items ranked early and scored well above the non-relevant ones.
  """
  sd, num_rel = msd_per_query(sim, query_ids, gallery_ids, mode)
  return msd_summary(sd, num_rel, np.shape(sim)[1])


# ----------------------------------------------------------------------------------------------------------------
# Linear probe.


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "weight_decay"))
def _train_probe(x, y, *, num_classes: int, steps: int, learning_rate: float, weight_decay: float):
  """Full-batch Adam on softmax cross-entropy + (weight_decay / 2) ||W||²; zero init. x [N, D], y [N]."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adam(learning_rate)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]  # [N, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  def step(_, carry):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


def _check_xy(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float32), np.asarray(y)
  if x.ndim != 2 or y.shape != (len(x),):
    raise ValueError(f"{name}_x must be [N, D] and {name}_y [N]; got {x.shape} and {y.shape}")
  if not len(x):
    raise ValueError(f"{name} set is empty")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f"{name}_y must hold non-negative integer class ids, got dtype {y.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}_x contains NaN or inf")
  return x, y.astype(np.int32)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int | None = None, steps: int = 500,
                          learning_rate: float = 1e-2, weight_decay: float = 1e-4) -> float:
  """Test accuracy in [0, 1] of a multinomial logistic regression trained on frozen embeddings.

  Features are standardised with the training set's per-dimension mean and std; the probe (weights and bias,
  zero-initialised) is trained with full-batch Adam for a fixed number of steps on the mean softmax
  cross-entropy plus an L2 penalty (weight_decay / 2) · ||W||², so the result is deterministic.

  Args:
    train_x: [N, D] float; train_y: [N] int class ids. test_x: [M, D]; test_y: [M].
    num_classes: defaults to 1 + the largest class id seen in either split.
    steps, learning_rate, weight_decay: the optimisation (Adam) settings.
  """
  train_x, train_y = _check_xy(train_x, train_y, "train")
  test_x, test_y = _check_xy(test_x, test_y, "test")
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
  seen = int(max(train_y.max(), test_y.max())) + 1
  num_classes = seen if num_classes is None else int(num_classes)
  if num_classes < seen:
    raise ValueError(f"num_classes={num_classes} but class id {seen - 1} occurs")
  if int(steps) < 1 or learning_rate <= 0 or weight_decay < 0:
    raise ValueError(f"need steps >= 1, learning_rate > 0, weight_decay >= 0; got {steps}, {learning_rate}, "
                     f"{weight_decay}")
  mean = train_x.mean(axis=0)
  std = np.maximum(train_x.std(axis=0), 1e-6)
  params = _train_probe(jnp.asarray((train_x - mean) / std), jnp.asarray(train_y), num_classes=num_classes,
                        steps=int(steps), learning_rate=float(learning_rate), weight_decay=float(weight_decay))
  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  pred = np.argmax(((test_x - mean) / std) @ w + b, axis=1)
  return float(np.mean(pred == test_y))
