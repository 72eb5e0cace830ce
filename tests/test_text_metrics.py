"""Text metrics against independent references: scipy, scikit-learn, brute-force loops, and the released mSD
script's output. The linear probe has its own file, test_linear_probe.py."""

import math

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics

from big_embed.evaluate import text_metrics as tm

# ----------------------------------------------------------------------------------------------------------------
# Naive references (plain loops over one query at a time). Imported by test_text_evals.py.


def naive_order(row):
  """Candidate indices best first; ties by lower index."""
  return sorted(range(len(row)), key=lambda j: (-row[j], j))


def naive_query_metrics(row, gains, k):
  """One query's metrics at cut-off k (None: the whole ranking) by walking its ranking once.

  `gains` maps each relevant column to its gain (> 0). Returns {recall, hit, rr, ap, ndcg}, nDCG with linear gains.
  """
  ranking = naive_order(row)
  k = len(ranking) if k is None else k
  found, rr, ap, dcg = 0, 0.0, 0.0, 0.0
  for pos, d in enumerate(ranking[:k]):
    if d in gains:
      found += 1
      rr = rr or 1.0 / (pos + 1)
      ap += found / (pos + 1)  # precision at this relevant item
      dcg += gains[d] / math.log2(pos + 2)
  ideal = sorted(gains.values(), reverse=True)[:k]
  idcg = sum(g / math.log2(pos + 2) for pos, g in enumerate(ideal))
  return {"recall": found / len(gains), "hit": float(found > 0), "rr": rr, "ap": ap / len(gains),
          "ndcg": dcg / idcg}


def as_gains(rel):
  """{column: gain} of a set of columns (gain 1) or of a mapping (gain-0 columns dropped)."""
  if isinstance(rel, dict):
    return {int(d): float(g) for d, g in rel.items() if g > 0}
  return {int(d): 1.0 for d in rel}


def naive_metrics(scores, relevant, k):
  """Every metric of `naive_query_metrics`, averaged over queries."""
  per_query = [naive_query_metrics(list(row), as_gains(rel), k) for row, rel in zip(scores, relevant)]
  return {name: float(np.mean([m[name] for m in per_query])) for name in per_query[0]}


def naive_retrieval(scores, relevant, k):
  """(recall@k, mrr@k, ndcg@k) with binary relevance."""
  m = naive_metrics(scores, [set(r) for r in relevant], k)
  return m["recall"], m["rr"], m["ndcg"]


def naive_precision(scores, labels, k):
  out = []
  for row, lab in zip(scores, labels):
    lab = {int(x) for x in lab}
    out.append(sum(j in lab for j in naive_order(row)[:k]) / k)
  return float(np.mean(out))


def naive_sd(sims, gallery_ids, query_id, mode):
  """SD of one query, or None when it has no relevant or no non-relevant item.

  "sorted": the paper's formula. "release": the released script's arithmetic, which indexes the similarities
  in gallery order with the relevance flags in rank order.
  """
  n = len(sims)
  s = [(x + 1) / 2 for x in sims]  # gallery order
  order = naive_order(s)
  rel = [1 if gallery_ids[order[r]] == query_id else 0 for r in range(n)]  # rank order
  big_r = sum(rel)
  if big_r in (0, n):
    return None
  if mode == "sorted":
    pos = [s[j] for j in range(n) if gallery_ids[j] == query_id]
    neg = [s[j] for j in range(n) if gallery_ids[j] != query_id]
    vals = [s[order[r]] for r in range(n)]  # similarity at rank r
  else:
    pos = [s[j] for j in range(n) if rel[j]]
    neg = [s[j] for j in range(n) if not rel[j]]
    vals = s
  rho = 1 - math.exp(-(sum(pos) / len(pos)) / (sum(neg) / len(neg)))
  total = 0.0
  for r in range(n):
    if rel[r]:
      num = sum(rel[u] * vals[u] for u in range(r + 1))
      den = sum(vals[u] for u in range(r + 1))
      total += num / den if den else 0.0
  return rho * total / big_r


def naive_msd(sim, query_ids, gallery_ids, mode):
  """(mSD on 0-100, number of queries kept)."""
  vals = [naive_sd(list(row), list(gallery_ids), q, mode) for row, q in zip(sim, query_ids)]
  kept = [v for v in vals if v is not None]
  return 100 * float(np.mean(kept)), len(kept)


# ----------------------------------------------------------------------------------------------------------------
# Correlation.

small_floats = st.lists(st.integers(-3, 3), min_size=3, max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_correlations_match_scipy(data):
  x = data.draw(small_floats)
  y = data.draw(st.lists(st.integers(-3, 3), min_size=len(x), max_size=len(x)))
  x, y = np.array(x, float) * 0.5, np.array(y, float)  # many ties
  if np.ptp(x) == 0 or np.ptp(y) == 0:
    assert math.isnan(tm.spearman(x, y)) and math.isnan(tm.pearson(x, y))
    return
  np.testing.assert_allclose(tm.spearman(x, y), stats.spearmanr(x, y).statistic, atol=1e-12)
  np.testing.assert_allclose(tm.pearson(x, y), stats.pearsonr(x, y).statistic, atol=1e-12)
  np.testing.assert_allclose(tm.average_ranks(x), stats.rankdata(x, method="average"))


def test_correlation_examples_and_errors():
  assert tm.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
  assert tm.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert tm.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="same length"):
    tm.spearman([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="at least 2"):
    tm.pearson([1], [1])
  with pytest.raises(ValueError, match="finite"):
    tm.pearson([1, np.nan, 2], [1, 2, 3])


# ----------------------------------------------------------------------------------------------------------------
# Retrieval.


def test_retrieval_hand_example():
  scores = np.array([[0.1, 0.9, 0.5, 0.7]])  # ranking: 1, 3, 2, 0
  rel = [{2, 0}]  # at ranks 2 and 3
  assert tm.relevant_ranks(scores, rel)[0].tolist() == [3, 2]
  assert tm.recall_at_k(scores, rel, 1) == 0.0
  assert tm.recall_at_k(scores, rel, 3) == 0.5
  assert tm.recall_at_k(scores, rel, 4) == 1.0
  assert tm.mrr_at_k(scores, rel, 10) == pytest.approx(1 / 3)
  assert tm.mrr_at_k(scores, rel, 2) == 0.0
  assert tm.ndcg_at_k(scores, rel, 10) == pytest.approx((1 / 2 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
  # Ties go to the lower index: both docs score 1, doc 0 ranks first.
  tied = np.array([[1.0, 1.0, 0.0]])
  assert tm.recall_at_k(tied, [{1}], 1) == 0.0 and tm.recall_at_k(tied, [{0}], 1) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_retrieval_matches_brute_force(data):
  q, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 25))
  scores = np.array(data.draw(st.lists(st.integers(0, 4), min_size=q * n, max_size=q * n)), float).reshape(q, n)
  relevant = [data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)) for _ in range(q)]
  for k in (1, 3, 10):
    want = naive_retrieval(scores, relevant, k)
    got = (tm.recall_at_k(scores, relevant, k), tm.mrr_at_k(scores, relevant, k), tm.ndcg_at_k(scores, relevant, k))
    np.testing.assert_allclose(got, want, atol=1e-12)
  mask = np.zeros((q, n), bool)
  for i, r in enumerate(relevant):
    mask[i, list(r)] = True
  assert tm.ndcg_at_k(scores, mask, 10) == pytest.approx(tm.ndcg_at_k(scores, relevant, 10))


def test_retrieval_errors():
  with pytest.raises(ValueError, match="query 1 has no relevant"):
    tm.recall_at_k(np.zeros((2, 3)), [{0}, set()], 1)
  with pytest.raises(ValueError, match="outside"):
    tm.recall_at_k(np.zeros((1, 3)), [{3}], 1)
  with pytest.raises(ValueError, match="2 entries"):
    tm.recall_at_k(np.zeros((1, 3)), [{0}, {1}], 1)
  with pytest.raises(ValueError, match="NaN"):
    tm.mrr_at_k(np.array([[np.nan, 1.0]]), [{0}])
  with pytest.raises(ValueError, match="positive integer"):
    tm.recall_at_k(np.zeros((1, 3)), [{0}], 0)


def _relevance(data, n, graded):
  """One query's relevance: a non-empty set of columns, or (graded) a mapping {column: gain in 1..3}."""
  cols = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))
  return {c: data.draw(st.integers(1, 3)) for c in cols} if graded else cols


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_ranking_metrics_match_per_query_loop(data):
  q, n = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 25))
  # Scores in 0..4: most rows have ties, which both sides break by the lower column index.
  scores = np.array(data.draw(st.lists(st.integers(0, 4), min_size=q * n, max_size=q * n)), float).reshape(q, n)
  graded = data.draw(st.booleans())
  relevant = [_relevance(data, n, graded) for _ in range(q)]
  ranks = tm.relevant_ranks(scores, relevant)
  for k in (1, 3, 10, 40):  # 40 > N: the whole ranking is inside the cut-off
    want = naive_metrics(scores, relevant, k)
    got = {"recall": tm.recall_at_k(scores, relevant, k), "hit": tm.hit_rate_at_k(scores, relevant, k),
           "rr": tm.mrr_at_k(scores, relevant, k), "ap": tm.map_at_k(scores, relevant, k),
           "ndcg": tm.ndcg_at_k(scores, relevant, k)}
    assert got == pytest.approx(want, abs=1e-12)
    assert tm.hit_rate_from_ranks(ranks, k) == pytest.approx(want["hit"], abs=1e-12)
    assert tm.map_from_ranks(ranks, k) == pytest.approx(want["ap"], abs=1e-12)
  assert tm.map_at_k(scores, relevant) == pytest.approx(naive_metrics(scores, relevant, None)["ap"], abs=1e-12)
  assert tm.map_at_k(scores, relevant, 40) == pytest.approx(tm.map_at_k(scores, relevant), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_ranking_metrics_match_sklearn(data):
  """scikit-learn as a second reference, on tie-free scores (it scores tied items as one group)."""
  q, n = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 25))
  scores = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1))).standard_normal((q, n))
  relevant = [_relevance(data, n, graded=True) for _ in range(q)]
  gains = np.zeros((q, n))
  for i, rel in enumerate(relevant):
    gains[i, list(rel)] = list(rel.values())
  want_map = np.mean([metrics.average_precision_score(g > 0, row) for g, row in zip(gains, scores)])
  assert tm.map_at_k(scores, relevant) == pytest.approx(want_map, abs=1e-12)
  for k in (1, 3, 10, 40):
    assert tm.ndcg_at_k(scores, relevant, k) == pytest.approx(metrics.ndcg_score(gains, scores, k=k), abs=1e-12)
    assert tm.ndcg_at_k(scores, gains > 0, k) == pytest.approx(metrics.ndcg_score(gains > 0, scores, k=k),
                                                               abs=1e-12)


def test_relevant_ranks_across_pair_chunks():
  """More (query, relevant item) pairs than one ranking chunk holds (256): ranks still match the loop."""
  rng = np.random.default_rng(3)
  scores = rng.integers(0, 6, (30, 40)).astype(float)
  relevant = [set(rng.choice(40, rng.integers(1, 20), replace=False).tolist()) for _ in range(30)]
  assert sum(map(len, relevant)) > 256
  for row, rel, got in zip(scores, relevant, tm.relevant_ranks(scores, relevant)):
    order = naive_order(list(row))
    assert got.tolist() == [order.index(d) for d in sorted(rel)]


def test_new_ranking_metrics_hand_example():
  # Ranking 1, 3, 2, 0, 4; relevant columns 0 (gain 3) and 2 (gain 1), at ranks 3 and 2.
  scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.0]])
  binary, graded = [{0, 2}], [{0: 3, 2: 1, 4: 0}]  # gain 0: judged, not relevant
  assert tm.relevant_ranks(scores, graded)[0].tolist() == [3, 2]
  # Recall averages the share of a query's relevant items; hit rate asks for any one of them.
  assert tm.recall_at_k(scores, binary, 3) == 0.5 and tm.hit_rate_at_k(scores, binary, 3) == 1.0
  assert tm.hit_rate_at_k(scores, binary, 2) == 0.0
  # AP: precision 1/3 at the first relevant item (rank 2), 2/4 at the second (rank 3).
  assert tm.map_at_k(scores, binary) == pytest.approx((1 / 3 + 2 / 4) / 2)
  assert tm.map_at_k(scores, binary, 3) == pytest.approx((1 / 3) / 2)  # the denominator stays R = 2
  # Graded nDCG, linear gains: DCG = 1 / log2(4) + 3 / log2(5); ideal: 3 at rank 0, 1 at rank 1.
  assert tm.ndcg_at_k(scores, graded, 10) == pytest.approx((1 / 2 + 3 / math.log2(5)) / (3 + 1 / math.log2(3)))
  assert tm.ndcg_at_k(scores, binary, 10) == pytest.approx((1 / 2 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
  # Gains only change nDCG.
  assert tm.map_at_k(scores, graded) == tm.map_at_k(scores, binary)
  assert tm.hit_rate_at_k(scores, graded, 3) == tm.hit_rate_at_k(scores, binary, 3)


def test_ranking_tie_rule_lower_column_first():
  tied = np.array([[1.0, 1.0, 1.0, 0.0]])  # columns 0, 1, 2 tie: ranked 0, 1, 2
  assert tm.relevant_ranks(tied, [{2, 1}])[0].tolist() == [1, 2]
  assert tm.map_at_k(tied, [{2}]) == pytest.approx(1 / 3)
  assert tm.map_at_k(tied, [{0}]) == 1.0
  assert tm.hit_rate_at_k(tied, [{1}], 1) == 0.0 and tm.hit_rate_at_k(tied, [{0}], 1) == 1.0
  assert tm.ndcg_at_k(tied, [{1: 2, 0: 1}], 2) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
  # A collapsed model (every score equal) gets the fixed ranking 0, 1, 2, ..., not a perfect score.
  flat = np.zeros((4, 4))
  assert tm.hit_rate_at_k(flat, [{i} for i in range(4)], 1) == 0.25


def test_new_ranking_metrics_errors():
  scores = np.zeros((2, 3))
  for metric in (tm.hit_rate_at_k, tm.map_at_k, tm.ndcg_at_k):
    with pytest.raises(ValueError, match="query 1 has no relevant"):
      metric(scores, [{0}, set()], 2)
    with pytest.raises(ValueError, match="query 1 has no relevant"):  # every gain 0: nothing relevant
      metric(scores, [{0: 1}, {1: 0, 2: 0}], 2)
    with pytest.raises(ValueError, match="positive integer"):
      metric(scores, [{0}, {1}], 0)
  with pytest.raises(ValueError, match=r"query 0 has a gain outside \[0, inf\)"):
    tm.ndcg_at_k(scores, [{0: -1}, {1: 1}])
  with pytest.raises(ValueError, match="finite"):
    tm.ndcg_at_k(scores, [{0: float("nan")}, {1: 1}])
  with pytest.raises(ValueError, match="aligned with the ranks"):
    tm.ndcg_from_ranks([np.array([0, 1])], 10, gains=[np.array([1.0])])
  with pytest.raises(ValueError, match="must be > 0"):
    tm.ndcg_from_ranks([np.array([0, 1])], 10, gains=[np.array([1.0, 0.0])])
  with pytest.raises(ValueError, match="outside"):
    tm.map_at_k(scores, [{0: 1}, {3: 2}])


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_precision_at_k_matches_brute_force(data):
  q, num_labels = data.draw(st.integers(1, 6)), data.draw(st.integers(5, 12))
  scores = np.array(data.draw(st.lists(st.integers(0, 3), min_size=q * num_labels, max_size=q * num_labels)),
                    float).reshape(q, num_labels)
  labels = [data.draw(st.sets(st.integers(0, num_labels - 1), max_size=num_labels)) for _ in range(q)]
  for k in (1, 5):
    assert tm.precision_at_k(scores, labels, k) == pytest.approx(naive_precision(scores, labels, k))


def test_precision_at_k_example_and_errors():
  scores = np.array([[0.9, 0.1, 0.8, 0.0, 0.7], [0.0, 0.0, 0.0, 0.0, 1.0]])
  labels = [{0, 4}, {1}]
  assert tm.precision_at_k(scores, labels, 1) == pytest.approx((1 + 0) / 2)
  assert tm.precision_at_k(scores, labels, 5) == pytest.approx((2 / 5 + 1 / 5) / 2)
  with pytest.raises(ValueError, match="at least 6 labels"):
    tm.precision_at_k(scores, labels, 6)


# ----------------------------------------------------------------------------------------------------------------
# mSD.


def _toy_example():
  """The released mSD script's toy example (10 text queries, 30 images, 768-d random features), re-stated with a
  seeded NumPy generator since the original draws unseeded features."""
  qids = np.array([1, 1, 3, 7, 5, 6, 6, 8, 8, 10])
  gids = np.array([1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                   19, 20])
  rng = np.random.RandomState(0)
  qf, gf = rng.randn(10, 768), rng.randn(30, 768)
  qf /= np.linalg.norm(qf, axis=1, keepdims=True)
  gf /= np.linalg.norm(gf, axis=1, keepdims=True)
  return qf @ gf.T, qids, gids


def test_msd_toy_example_matches_released_script():
  sim, qids, gids = _toy_example()
  # mSD_rank of the released script on exactly this similarity matrix prints 10.164239 (it runs in PyTorch, so
  # the number was produced once outside this project); the paper's sorted form gives 10.197689.
  release, srt = tm.msd(sim, qids, gids, "release"), tm.msd(sim, qids, gids, "sorted")
  assert release.msd == pytest.approx(10.164239, abs=1e-5)
  assert srt.msd == pytest.approx(10.197689, abs=1e-5)
  assert (release.num_queries, release.dropped_no_relevant, release.dropped_all_relevant) == (10, 0, 0)
  for mode, got in (("release", release), ("sorted", srt)):
    assert got.msd == pytest.approx(naive_msd(sim, qids, gids, mode)[0], abs=1e-9)


def test_msd_hand_example():
  # One query (id 7), gallery ids [7, 0, 7]; cosine sims [0.6, 0.8, -0.2] -> s' = [0.8, 0.9, 0.4].
  sim, qids, gids = np.array([[0.6, 0.8, -0.2]]), np.array([7]), np.array([7, 0, 7])
  rho = 1 - math.exp(-((0.8 + 0.4) / 2) / 0.9)
  # Sorted: ranking 0.9 (neg), 0.8 (pos), 0.4 (pos): ratios at the hits 0.8 / 1.7 and 1.2 / 2.1.
  want_sorted = 100 * rho * (0.8 / 1.7 + 1.2 / 2.1) / 2
  assert tm.msd(sim, qids, gids, "sorted").msd == pytest.approx(want_sorted)
  # Release: flags in rank order [0, 1, 1] over sims in gallery order [0.8, 0.9, 0.4]: mu+ = (0.9 + 0.4) / 2,
  # mu- = 0.8, ratios at positions 1 and 2: 0.9 / 1.7 and 1.3 / 2.1.
  rho_rel = 1 - math.exp(-((0.9 + 0.4) / 2) / 0.8)
  want_release = 100 * rho_rel * (0.9 / 1.7 + 1.3 / 2.1) / 2
  assert tm.msd(sim, qids, gids, "release").msd == pytest.approx(want_release)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_msd_matches_per_query_loop(data):
  q, n, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12)), data.draw(st.integers(2, 4))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
  qf, gf = rng.standard_normal((q, d)), rng.standard_normal((n, d))
  sim = (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (gf / np.linalg.norm(gf, axis=1, keepdims=True)).T
  gids = rng.integers(0, 3, n)
  qids = rng.integers(0, 4, q)  # id 3 never relevant; a gallery of one id has every item relevant
  counts = [(gids == i).sum() for i in qids]
  for mode in tm.MSD_MODES:
    if all(c in (0, n) for c in counts):
      with pytest.raises(ValueError, match="undefined"):
        tm.msd(sim, qids, gids, mode)
      continue
    got = tm.msd(sim, qids, gids, mode)
    want, kept = naive_msd(sim, qids, gids, mode)
    assert got.msd == pytest.approx(want, abs=1e-9)
    assert got.num_queries == kept
    assert got.dropped_no_relevant == sum(c == 0 for c in counts)
    assert got.dropped_all_relevant == sum(c == n for c in counts if n)


def test_msd_release_equals_sorted_on_presorted_rows():
  sim, qids, gids = _toy_example()
  sim = sim[:1]  # one query: sort its gallery once
  order = np.argsort(-sim[0], kind="stable")
  presorted_sim, presorted_gids = sim[:, order], gids[order]
  assert tm.msd(presorted_sim, qids[:1], presorted_gids, "release").msd == pytest.approx(
      tm.msd(sim, qids[:1], gids, "sorted").msd)


def test_msd_sorted_ignores_gallery_order_release_does_not():
  sim, qids, gids = _toy_example()
  perm = np.random.default_rng(1).permutation(sim.shape[1])
  assert tm.msd(sim[:, perm], qids, gids[perm], "sorted").msd == pytest.approx(tm.msd(sim, qids, gids, "sorted").msd)
  assert tm.msd(sim[:, perm], qids, gids[perm], "release").msd != pytest.approx(
      tm.msd(sim, qids, gids, "release").msd, abs=1e-3)


def test_msd_errors():
  with pytest.raises(ValueError, match="mode"):
    tm.msd(np.zeros((1, 2)), [0], [0, 1], "paper")
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    tm.msd(np.full((1, 2), 3.0), [0], [0, 1])
  with pytest.raises(ValueError, match="gallery_ids"):
    tm.msd(np.zeros((1, 2)), [0], [0, 1, 2])
