"""PEG's progressive weighting vs plain InfoNCE: image → text InfoNCE (τ = 0.05) with the focal weighting ramped
over the whole run, against the same loss without it (`peg_mode=none`); the quickstart model and data, 150 steps of
batch 128, 3 seeds.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m experiments.peg
"""

from experiments import common as ex

EXPERIMENT = "peg"
CLAIM = "PEG's progressive (focal) weighting of the InfoNCE terms beats plain InfoNCE at the same budget."
BUDGET = ex.image_text_budget()


def runs() -> list[ex.Run]:
  return [ex.Run(arm, "configs/peg.py", seed, BUDGET + extra) for arm, extra in (
      ("infonce_i2t", ("--config.loss.peg_mode=none",)),
      ("peg", (f"--config.loss.peg_ramp_steps={ex.lookup_steps(BUDGET)}",))) for seed in ex.SEEDS]


def main() -> None:
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), ex.IMAGE_TEXT_METRICS, [("peg", "infonce_i2t")],
                    "PEG vs InfoNCE (image → text), 150 steps × 128 (%)")


if __name__ == "__main__":
  main()
