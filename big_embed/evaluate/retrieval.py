"""Image <-> text retrieval recall@k over a paired test split (one caption per image)."""

from __future__ import annotations

import numpy as np

from big_embed.data import pipeline
from big_embed.evaluate import registry


def paired_recall_at_k(scores: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """{k: recall@k in percent} for paired data: query i's one correct item is gallery item i.

  scores: [N, N], query rows against gallery columns. The correct item's 0-based rank counts the gallery items
  scoring higher plus those tying with it at a lower column index: ties go to the lower index (a stable sort), the
  rule of every ranking metric in big_embed.evaluate, so a collapsed model (all scores equal) gets k / N, not 100%.
  """
  if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
    raise ValueError(f"paired retrieval needs square scores [N, N], got shape {scores.shape}")
  correct = np.diagonal(scores)[:, None]  # [N, 1]
  cols, rows = np.arange(scores.shape[1])[None, :], np.arange(scores.shape[0])[:, None]
  rank = np.sum((scores > correct) | ((scores == correct) & (cols < rows)), axis=1)  # [N]
  return {k: 100.0 * float(np.mean(rank < k)) for k in ks}


@registry.register("retrieval")
class Retrieval:
  """Settings: dataset (a prepared image-caption dataset), split. Metrics: {i2t,t2i}_r{1,5,10}, chance_r10."""

  def __init__(self, settings, ctx: registry.EvalContext):
    self.ctx = ctx
    data = pipeline.load_retrieval_set(settings.dataset, ctx.data_dir, image_size=ctx.image_size,
                                       split=settings.split)
    self.images = data["images"]
    self.tokens = ctx.tokenizer.encode_batch(list(data["captions"]), ctx.max_text_len)
    self.desc = f"retrieval {settings.dataset}"

  def run(self, params) -> dict[str, float]:
    img = self.ctx.encoder.images(params, self.images, desc=self.desc)
    txt = self.ctx.encoder.texts(params, self.tokens)
    sim = img @ txt.T  # [N, N]
    out = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
      for k, v in paired_recall_at_k(scores).items():
        out[f"{direction}_r{k}"] = v
    out["chance_r10"] = 100.0 * min(10, len(sim)) / len(sim)
    return out
