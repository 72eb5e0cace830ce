"""Piccolo2's multi-task hybrid loss (InfoNCE for retrieval, CoSENT-style ranking for STS-like pairs, label InfoNCE
for classification, with Matryoshka nesting) vs InfoNCE on the retrieval tasks only, under the same steps: the
2-layer MiniLM student of configs/piccolo2_hybrid.py, evaluated on STS, classification (linear probes) and
retrieval.

    python -m big_embed.data.prepare bible wordnet foldoc debian_packages fortunes lee50 wordsim353 simlex999
    python -m experiments.piccolo2
"""

from experiments import common as ex

EXPERIMENT = "piccolo2"
CLAIM = ("Piccolo2's multi-task hybrid loss beats retrieval-only InfoNCE across STS, classification and retrieval "
         "evaluations.")
STS = ("lee50", "wordsim353", "simlex999")
RETRIEVAL = ("bible", "wordnet", "foldoc", "debian")
METRICS = {"STS mean": ex.mean_of(*(f"{s}/spearman" for s in STS)),
           "classification mean": ex.mean_of("fortunes/accuracy", "lexnames/accuracy"),
           "retrieval R@1 mean": ex.mean_of(*(f"{r}/recall@1" for r in RETRIEVAL))}
STEPS = 80
BUDGET = (f"--config.train.steps={STEPS}", f"--config.train.warmup_steps={STEPS // 10}",
          f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}",
          "--config.train.keep_checkpoints=1")
SEEDS = ex.SEEDS


def runs() -> list[ex.Run]:
  return [ex.Run(arm, f"configs/piccolo2_hybrid.py{arg}", seed, BUDGET)
          for arm, arg in (("hybrid", ""), ("retrieval_infonce", ":retrieval_only")) for seed in SEEDS]


def main() -> None:
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), METRICS, [("hybrid", "retrieval_infonce")],
                    f"2-layer MiniLM, {STEPS} steps")


if __name__ == "__main__":
  main()
