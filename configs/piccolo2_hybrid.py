"""Piccolo2's multi-task hybrid loss with Matryoshka nesting (Huang et al. 2024, arXiv 2405.06932 §3) over the text corpora.

Every global batch holds one task; the task picks the loss (big_embed.losses.hybrid):
  retrieval (InfoNCE, τ = 0.01, per-device negatives):  Bible KJV -> WEB, WordNet definition -> lemmas,
                                             FOLDOC definition -> term, Debian summary -> description;
  classification (InfoNCE over label texts, τ = 0.05, weight 0.2): fortunes -> category,
                                             WordNet definition -> lexicographer file ("noun animal").
Each branch is averaged over the Matryoshka prefixes 96, 192 and 384 of the embedding. The STS branch (CoSENT,
weight 0.04) needs graded training pairs, which none of the local corpora provide (Lee-50, WordSim-353 and
SimLex-999 are kept for evaluation); a task with type="sts" switches it on.

The model is the first 2 layers of all-MiniLM-L6-v2, fine-tuned. The evaluation reports the Matryoshka curve
(every metric at each prefix width, "<metric>@d<dim>").

    python -m big_embed.data.prepare bible wordnet debian_packages fortunes foldoc lee50 wordsim353 simlex999
    python -m big_embed.main --config configs/piccolo2_hybrid.py --mode eval --workdir runs/piccolo2_hybrid  # before
    python -m big_embed.main --config configs/piccolo2_hybrid.py --workdir runs/piccolo2_hybrid

Argument "retrieval_only": the baseline experiments/piccolo2.py compares with: the four retrieval tasks only, plain
InfoNCE (τ = 0.01, as the hybrid's retrieval branch), no Matryoshka nesting; the same evaluations.
"""

import pathlib

from big_embed import config_utils as cu

MRL_DIMS = (96, 192, 384)


def get_config(arg=None):
  args = cu.parse_arg(arg, tiny=False, retrieval_only=False)
  c = cu.load_recipe(pathlib.Path(__file__).with_name("pretrained_minilm.py"), "sts")
  c.model.num_layers = 2
  c.model.max_text_len = 48
  task = cu.text_task
  c.data.tasks.bible = task(type="retrieval", dataset="bible", fields={"query": "kjv", "doc": "web"})
  c.data.tasks.wordnet_defs = task(type="retrieval", dataset="wordnet",
                        fields={"query": "definition", "doc": "lemmas"})
  c.data.tasks.foldoc = task(type="retrieval", dataset="foldoc", fields={"query": "definition", "doc": "term"})
  c.data.tasks.debian = task(type="retrieval", dataset="debian_packages",
                             fields={"query": "summary", "doc": "description"})
  c.data.tasks.fortunes = task(type="classification", dataset="fortunes", batch_size=16, num_negatives=7,
                    fields={"text": "text", "label": "category"})
  c.data.tasks.lexnames = task(type="classification", dataset="wordnet", batch_size=16, num_negatives=7,
                    fields={"text": "definition", "label": "lexname"})
  c.loss = cu.loss("hybrid", mrl_dims=MRL_DIMS, mrl_reduction="mean")
  c.train.update(dict(batch_size=32, steps=240, learning_rate=1e-4, warmup_steps=24, weight_decay=0.01,
                      log_every=20, eval_every=240, checkpoint_every=80))
  cap = dict(max_queries=500, max_docs=2000, dims=MRL_DIMS)
  c.evals.bible = dict(type="text_retrieval", dataset="bible", split="test", **cap)
  c.evals.wordnet = dict(type="text_retrieval", dataset="wordnet", split="test", **cap)
  c.evals.foldoc = dict(type="text_retrieval", dataset="foldoc", split="test", **cap)
  c.evals.debian = dict(type="text_retrieval", dataset="debian_packages", split="test", **cap)
  probe = dict(type="linear_probe", max_train=3000, max_test=1000)
  c.evals.fortunes = dict(dataset="fortunes", text_field="text", label_field="category", **probe)
  c.evals.lexnames = dict(dataset="wordnet", text_field="definition", label_field="lexname", **probe)
  if args.tiny:
    _make_tiny(c)
  if args.retrieval_only:
    del c.data.tasks["fortunes"], c.data.tasks["lexnames"]
    c.loss = cu.loss("infonce", temperature=0.01)  # the hybrid's retrieval branch (its default τ)
  return c


def _make_tiny(c):
  """A random-init 1-layer tower (MiniLM's tokenizer), a few steps of every task, small evals."""
  cu.make_tiny_text(c, steps=8)
  c.loss.mrl_dims = (16, 32)
  c.data.tasks.fortunes.batch_size = 8
  c.data.tasks.lexnames.batch_size = 8
  c.data.tasks.fortunes.num_negatives = 3
  c.data.tasks.lexnames.num_negatives = 3
  for name in ("bible", "wordnet", "foldoc", "debian"):
    c.evals[name].update(dict(max_queries=32, max_docs=128, dims=(16, 32)))
  for name in ("fortunes", "lexnames"):
    c.evals[name].update(dict(max_train=200, max_test=100))
