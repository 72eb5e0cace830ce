"""mSD, the mean similarity distance of UFineBench (Zuo et al., CVPR 2024, arXiv 2312.03441), on a 0-100 scale.

Two modes: "sorted", the paper's rank-consistent definition, and "release", the arithmetic of the authors' released
script (see `msd_per_query`); a reported number should say which one it used.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from big_embed.evaluate import ranking_metrics

MSD_MODES = ("sorted", "release")


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
  sim = ranking_metrics.check_scores(sim, "sim").astype(np.float64)
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
