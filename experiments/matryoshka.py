"""Matryoshka representation learning: the 2-layer MiniLM student trained with InfoNCE averaged over the prefixes
48, 96, 192 and 384 vs plain InfoNCE (the distillation experiment's no-teacher arm, the same runs), evaluated on
WordNet retrieval and the three STS sets at every prefix dim; 3 seeds.

    python -m big_embed.data.prepare wordnet lee50 wordsim353 simlex999
    python -m big_embed.mine --config configs/distill_minilm.py --task wordnet --model minilm --name wordnet_minilm
    python -m experiments.matryoshka
"""

from experiments import common as ex

EXPERIMENT = "matryoshka"
CLAIM = ("Matryoshka training keeps short prefixes of the embedding useful: at small prefix dims the MRL-trained "
         "model beats the plain-trained one on retrieval and STS, at little cost at the full dim.")
RECIPE = "configs/distill_minilm.py"
DIMS = (48, 96, 192, 384)
STS_SETS = ("lee50", "wordsim353", "simlex999")


def _at(metric: str, dim: int) -> str:
  return metric if dim == DIMS[-1] else f"{metric}@d{dim}"


METRICS = {**{f"WordNet R@1 @{d}": f"wordnet/{_at('recall@1', d)}" for d in DIMS},
           **{f"STS mean @{d}": ex.mean_of(*(f"{s}/{_at('spearman', d)}" for s in STS_SETS)) for d in DIMS}}


def runs() -> list[ex.Run]:
  return [ex.Run(objective, f"{RECIPE}:{objective}", seed) for objective in ("none", "matryoshka")
          for seed in ex.SEEDS]


def main() -> None:
  records = ex.run_all(EXPERIMENT, runs())
  summary = ex.summarise(records, METRICS)
  verdicts = {f"matryoshka vs none: {m}": ex.compare(summary, "matryoshka", "none", m)
              for m in METRICS if m.endswith(f"@{DIMS[0]}")}
  panels = {label: {arm: [(d, arm, f"{label} @{d}") for d in DIMS] for arm in ("none", "matryoshka")}
            for label in ("WordNet R@1", "STS mean")}
  figure = ex.line_figure(EXPERIMENT, summary, panels, "prefix dim", "2-layer MiniLM student: plain vs Matryoshka",
                          logx=True)
  ex.save(EXPERIMENT, ex.payload(EXPERIMENT, CLAIM, records, summary, verdicts, figure, verdict=ex.verdict(verdicts),
                                 dims=list(DIMS)))


if __name__ == "__main__":
  main()
