"""The text-evaluation metrics under one name: correlation, ranking, mSD and the linear probe.

Each family lives in its own module (`correlation`, `ranking_metrics`, `msd`, `linear_probe`); this module gathers
their public names so that evaluators write `text_metrics.recall_from_ranks`, `text_metrics.msd`, ... Ranking
metrics share one tie rule (ties go to the lower column index) and one input format; see `ranking_metrics`.
"""

from __future__ import annotations

# pylint: disable=unused-import
from big_embed.evaluate.correlation import average_ranks, pearson, spearman  # noqa: F401
from big_embed.evaluate.linear_probe import LogisticProbe, fit_linear_probe, linear_probe_accuracy  # noqa: F401
from big_embed.evaluate.msd import MSD_MODES, MSDResult, msd, msd_per_query, msd_summary  # noqa: F401
from big_embed.evaluate.ranking_metrics import (  # noqa: F401
    check_scores, hit_rate_at_k, hit_rate_from_ranks, map_at_k, map_from_ranks, mrr_at_k, mrr_from_ranks, ndcg_at_k,
    ndcg_from_ranks, precision_at_k, recall_at_k, recall_from_ranks, relevance_gains, relevant_lists, relevant_ranks)
