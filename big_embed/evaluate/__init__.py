"""Evaluators (zero-shot classification, image-text retrieval, the text suite), selected by `config.evals`."""

from big_embed.evaluate import retrieval, text_evals, zero_shot  # noqa: F401  (register their types)
from big_embed.evaluate.registry import EvalContext, build_evaluators, run_evaluators  # noqa: F401
