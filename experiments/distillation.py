"""Distillation from a real teacher: the full 6-layer all-MiniLM-L6-v2, loaded through big_embed and run frozen
inside the step, into a 2-layer student (MiniLM's first 2 layers), on WordNet definition -> lemmas retrieval; the
student without a teacher is the baseline. Same data, steps, batch and learning rate for every arm.

    python -m big_embed.data.prepare wordnet lee50 wordsim353 simlex999
    python -m big_embed.mine --config configs/distill_minilm.py --task wordnet --model minilm --name wordnet_minilm
    python -m big_embed.embed_teacher --config configs/distill_minilm.py --task wordnet --model minilm \
        --name wordnet_minilm_teacher
    python -m experiments.distillation

Arms (configs/distill_minilm.py): none, disco (DisCo embedding MSE + InfoNCE), sinkd (SinKD: CE + KL + Sinkhorn
over similarity rows), soft_labels (LG-ANNA-style teacher soft labels over in-batch and adaptive-margin mined
candidates), and disco_precomputed: DisCo from the teacher's embeddings precomputed into the dataset once
(`embed_teacher`) instead of run in the step, one seed. References, evaluated without training: the teacher (all 6
layers, the student's 32-token inputs) and the untrained 2-layer student.
"""

from experiments import common as ex

EXPERIMENT = "distillation"
CLAIM = ("A 2-layer student distilled from the 6-layer MiniLM (DisCo, SinKD, teacher soft labels) beats the same "
         "student trained without a teacher on the STS evaluations.")
RECIPE = "configs/distill_minilm.py"
METHODS = ("disco", "sinkd", "soft_labels")
STS = {"lee50": "lee50/spearman", "wordsim353": "wordsim353/spearman", "simlex999": "simlex999/spearman"}
METRICS = {**STS, "STS mean": ex.mean_of(*STS.values()), "WordNet R@1": "wordnet/recall@1"}


def runs() -> list[ex.Run]:
  arms = [ex.Run(objective, f"{RECIPE}:{objective}", seed) for objective in ("none", *METHODS) for seed in ex.SEEDS]
  precomputed = ex.Run("disco_precomputed", f"{RECIPE}:disco", 0, (
      "--config.teacher.pretrained=", "--config.data.tasks.wordnet.teacher_embeddings=wordnet_minilm_teacher"))
  references = [ex.Run("teacher", f"{RECIPE}:none", 0, ("--config.model.num_layers=6",), mode="eval"),
                ex.Run("untrained_student", f"{RECIPE}:none", 0, mode="eval")]
  return arms + [precomputed] + references


def main() -> None:
  ex.arms_experiment(EXPERIMENT, CLAIM, runs(), METRICS, [(m, "none") for m in METHODS],
                    "2-layer MiniLM student, 100 steps × 32 (Spearman ρ, recall)", verdict_metrics=["STS mean"])


if __name__ == "__main__":
  main()
