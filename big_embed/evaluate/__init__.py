"""Evaluators (zero-shot classification, retrieval), selected by `config.evals`."""

from big_embed.evaluate import retrieval, zero_shot  # noqa: F401  (register their types)
from big_embed.evaluate.registry import EvalContext, build_evaluators, run_evaluators  # noqa: F401
