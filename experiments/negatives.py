"""More in-batch negatives at equal steps (PEG's premise), the largest batch through exact gradient caching: the
quickstart model and data, 150 steps at each batch size.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m experiments.negatives

The batch sweep is CLIP's symmetric InfoNCE (the same runs as experiments/siglip_batch.py's CLIP arm) plus batch
512 with `train.embed_chunk_size=128` (the towers embed 128 rows at a time; the step is exactly the plain step's).
"""

from experiments import common as ex
from experiments import siglip_batch

EXPERIMENT = "negatives"
CLAIM = "More in-batch negatives give better embeddings at equal steps (the premise of PEG's huge batches)."
BATCH_SIZES = (*siglip_batch.BATCH_SIZES, 512)
CHUNKED = {512: 128}  # batch size -> embed_chunk_size
SEEDS = siglip_batch.SEEDS


def runs() -> list[ex.Run]:
  return [ex.Run(siglip_batch.arm("clip", b), "configs/quickstart.py", seed,
                  ex.image_text_budget(batch_size=b) + ((f"--config.train.embed_chunk_size={CHUNKED[b]}",)
                                                        if b in CHUNKED else ()))
           for b in BATCH_SIZES for seed in SEEDS]


def main() -> None:
  records = ex.run_all(EXPERIMENT, runs())
  summary = ex.summarise(records, ex.IMAGE_TEXT_METRICS)
  smallest, largest = siglip_batch.arm("clip", BATCH_SIZES[0]), siglip_batch.arm("clip", BATCH_SIZES[-1])
  verdicts = {f"batch {BATCH_SIZES[-1]} vs {BATCH_SIZES[0]}: {m}": ex.compare(summary, largest, smallest, m)
              for m in ex.IMAGE_TEXT_METRICS}
  panels = {m: {"clip": [(b, siglip_batch.arm("clip", b), m) for b in BATCH_SIZES]} for m in ex.IMAGE_TEXT_METRICS}
  figure = ex.line_figure(EXPERIMENT, summary, panels, "batch size (in-batch negatives + 1)",
                          "CLIP InfoNCE at 150 steps", logx=True)
  ex.save(EXPERIMENT, ex.payload(EXPERIMENT, CLAIM, records, summary, verdicts, figure, verdict=ex.verdict(verdicts),
                                 batch_sizes=list(BATCH_SIZES), chunked=CHUNKED))


if __name__ == "__main__":
  main()
