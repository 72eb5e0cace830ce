"""DEXML's decoupled softmax and soft top-k vs multi-label InfoNCE and vs one-vs-all binary cross-entropy, on the
Debian debtags task (package summary -> its tags; every tag of the batch's packages is a candidate): the 2-layer
MiniLM student of configs/dexml_debtags.py, the same budget for every loss, P@1 and P@5 over 2000 test packages.

    python -m big_embed.data.prepare debian_packages lee50 wordsim353 simlex999
    python -m experiments.dexml
"""

from experiments import common as ex

EXPERIMENT = "dexml"
CLAIM = ("DEXML's decoupled softmax (and its soft top-k) beat the multi-label InfoNCE softmax and binary cross-entropy "
         "on multi-label retrieval (P@1, P@5).")
MODES = ("decoupled", "topk", "softmax", "bce")
METRICS = {"P@1": "debtags/p@1", "P@5": "debtags/p@5"}
STEPS = 80
BUDGET = (f"--config.train.steps={STEPS}", f"--config.train.warmup_steps={STEPS // 10}",
          f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}",
          "--config.train.keep_checkpoints=1", "--config.evals.sections.max_train=1000",
          "--config.evals.sections.max_test=500")
SEEDS = ex.SEEDS[:2]


def runs() -> list[ex.Run]:
  return [ex.Run(f"dexml_{mode}", "configs/dexml_debtags.py", seed, BUDGET + (f"--config.loss.mode={mode}",))
          for mode in MODES for seed in SEEDS]


def main() -> None:
  comparisons = [(f"dexml_{method}", f"dexml_{base}") for method in ("decoupled", "topk")
                 for base in ("softmax", "bce")]
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), METRICS, comparisons, f"debtags, 2-layer MiniLM, {STEPS} steps × 64")


if __name__ == "__main__":
  main()
