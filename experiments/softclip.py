"""SoftCLIP (soft intra-modal targets + neg-KL) vs CLIP's InfoNCE under the same budget: the quickstart model and
data, 150 steps of batch 128, 3 seeds.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m experiments.softclip
"""

from experiments import common as ex

EXPERIMENT = "softclip"
CLAIM = ("SoftCLIP's soft targets from intra-modal similarity plus neg-KL beat CLIP's one-hot InfoNCE on zero-shot "
         "classification and retrieval at the same budget.")
BUDGET = ex.image_text_budget()


def runs() -> list[ex.Run]:
  return [ex.Run(arm, recipe, seed, BUDGET) for arm, recipe in (("clip", "configs/quickstart.py"),
                                                                ("softclip", "configs/softclip.py"))
          for seed in ex.SEEDS]


def main() -> None:
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), ex.IMAGE_TEXT_METRICS, [("softclip", "clip")],
                    "SoftCLIP vs CLIP, 150 steps × 128 (%)")


if __name__ == "__main__":
  main()
