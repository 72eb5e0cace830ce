"""LightCLIP's progressive label softening vs hard labels (CLIP) under the same budget: the quickstart model and
data, 150 steps of batch 128, the softening ramped over all 150 steps to ε = 0.1, 3 seeds.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m experiments.lightclip
"""

from experiments import common as ex

EXPERIMENT = "lightclip"
CLAIM = "LightCLIP's progressively softened labels beat hard one-hot labels at the same budget."
BUDGET = ex.image_text_budget()


def runs() -> list[ex.Run]:
  ramp = (f"--config.loss.ramp_steps={ex.lookup_steps(BUDGET)}",)
  return ([ex.Run("clip", "configs/quickstart.py", seed, BUDGET) for seed in ex.SEEDS] +
          [ex.Run("lightclip", "configs/lightclip.py", seed, BUDGET + ramp) for seed in ex.SEEDS])


def main() -> None:
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), ex.IMAGE_TEXT_METRICS, [("lightclip", "clip")],
                    "LightCLIP vs CLIP, 150 steps × 128 (%)")


if __name__ == "__main__":
  main()
