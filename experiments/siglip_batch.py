"""SigLIP's pairwise sigmoid loss vs CLIP's softmax InfoNCE across batch sizes, at equal steps: the quickstart model
and data, 150 steps at each batch size.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m experiments.siglip_batch
"""

from experiments import common as ex

EXPERIMENT = "siglip_batch"
CLAIM = ("SigLIP's sigmoid loss matches or beats softmax InfoNCE, with its largest advantage at small batch sizes "
         "(Zhai et al., 2023).")
BATCH_SIZES = (16, 64, 256)
SEEDS = ex.SEEDS[:2]


def arm(loss: str, batch_size: int) -> str:
  return f"{loss}-b{batch_size}"


def runs() -> list[ex.Run]:
  recipes = {"clip": "configs/quickstart.py", "siglip": "configs/siglip.py"}
  return [ex.Run(arm(loss, b), recipe, seed, ex.image_text_budget(batch_size=b))
          for loss, recipe in recipes.items() for b in BATCH_SIZES for seed in SEEDS]


def main() -> None:
  records = ex.run_all(EXPERIMENT, runs())
  summary = ex.summarise(records, ex.IMAGE_TEXT_METRICS)
  verdicts = {f"siglip vs clip at batch {b}: {m}": ex.compare(summary, arm("siglip", b), arm("clip", b), m)
              for b in BATCH_SIZES for m in ex.IMAGE_TEXT_METRICS}
  panels = {m: {loss: [(b, arm(loss, b), m) for b in BATCH_SIZES] for loss in ("clip", "siglip")}
            for m in ex.IMAGE_TEXT_METRICS}
  figure = ex.line_figure(EXPERIMENT, summary, panels, "batch size", "SigLIP vs CLIP at 150 steps", logx=True)
  ex.save(EXPERIMENT, ex.payload(EXPERIMENT, CLAIM, records, summary, verdicts, figure, verdict=ex.verdict(verdicts),
                                 batch_sizes=list(BATCH_SIZES)))


if __name__ == "__main__":
  main()
