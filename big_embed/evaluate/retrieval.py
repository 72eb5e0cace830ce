"""Image <-> text retrieval recall@k over a paired test split (one caption per image)."""

from __future__ import annotations

import numpy as np

from big_embed.data import pipeline
from big_embed.evaluate import registry


def recall_at_k(scores: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
  """scores: [N_query, N_gallery], the correct item of query i is gallery item i. Percent."""
  correct = np.diagonal(scores)[:, None]
  # Rank = number of gallery items scoring strictly higher than the correct one (ties favour the correct one).
  rank = np.sum(scores > correct, axis=1)
  return {k: 100.0 * float(np.mean(rank < k)) for k in ks}


@registry.register("retrieval")
class Retrieval:
  """Settings: dataset (a prepared image-caption dataset), split. Metrics: {i2t,t2i}_r{1,5,10}, chance_r10."""

  def __init__(self, settings, ctx: registry.EvalContext):
    self.ctx = ctx
    data = pipeline.load_retrieval_set(ctx.data_dir, image_size=ctx.image_size, split=settings.split)
    self.images = data["images"]
    self.tokens = ctx.tokenizer.encode_batch(list(data["captions"]), ctx.max_text_len)
    self.desc = f"retrieval {settings.dataset}"

  def run(self, params) -> dict[str, float]:
    img = self.ctx.encoder.images(params, self.images, desc=self.desc)
    txt = self.ctx.encoder.texts(params, self.tokens)
    sim = img @ txt.T  # [N, N]
    out = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
      for k, v in recall_at_k(scores).items():
        out[f"{direction}_r{k}"] = v
    out["chance_r10"] = 100.0 * min(10, len(sim)) / len(sim)
    return out
