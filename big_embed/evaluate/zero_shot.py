"""Zero-shot classification: class embeddings from prompt templates (ensembled), nearest class per image."""

from __future__ import annotations

import numpy as np

from big_embed.data import pipeline
from big_embed.evaluate import registry


def class_embeddings(encoder, params, tokenizer, class_names, templates, max_len) -> np.ndarray:
  """[C, E]: mean over templates of the normalised prompt embeddings, renormalised (CLIP prompt ensembling)."""
  prompts = [t.format(c) for c in class_names for t in templates]
  emb = encoder.texts(params, tokenizer.encode_batch(prompts, max_len))  # [C * T, E]
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Top-k accuracy in [0, 1]: the fraction of rows whose true class is among their k highest-scoring classes.

  scores: [N, C]; labels: [N] int class ids; k >= 1 (k >= C counts every row). Ties go to the lower class index
  (a stable sort), the rule of every ranking metric in big_embed.evaluate: a true class tied with a lower-index one
  ranks after it, so a collapsed model (all scores equal) gets the share of rows with labels < k, not 100%.
  """
  if k < 1:
    raise ValueError(f"top-k accuracy needs k >= 1, got {k}")
  topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, min(k, C)]
  return float(np.mean(np.any(topk == labels[:, None], axis=1)))


@registry.register("zero_shot")
class ZeroShot:
  """Settings: dataset (a prepared labelled image dataset), split. Metrics: top1, top5 (percent)."""

  def __init__(self, settings, ctx: registry.EvalContext):
    data = pipeline.load_zero_shot_set(settings.dataset, ctx.data_dir, image_size=ctx.image_size,
                                       split=settings.split)
    self.images, self.labels, self.class_names = data["images"], data["labels"], data["class_names"]
    self.templates = list(settings.get("templates", None) or data["templates"])  # [T] "a photo of a {}."
    self.ctx, self.desc = ctx, f"zero-shot {settings.dataset}"

  def run(self, params) -> dict[str, float]:
    classes = class_embeddings(self.ctx.encoder, params, self.ctx.tokenizer, self.class_names, self.templates,
                               self.ctx.max_text_len)
    img = self.ctx.encoder.images(params, self.images, desc=self.desc)  # [N, E]
    scores = img @ classes.T  # [N, C]
    return {"top1": 100 * topk_accuracy(scores, self.labels, 1),
            "top5": 100 * topk_accuracy(scores, self.labels, min(5, len(self.class_names)))}
