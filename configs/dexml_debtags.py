"""DEXML decoupled softmax (Gupta et al., ICLR 2024, arXiv 2310.10636) on Debian debtags: package summary -> its tags.

Extreme multi-label retrieval with a dual encoder: package summaries and tag texts ("game::strategy" ->
"game strategy") go through one shared text tower. Each row samples one of its tags; the global batch's sampled
tags form the label pool (each distinct tag once). Decoupled softmax normalises each positive only against the
tags the package does NOT have, so a package's several tags do not compete (τ = 0.05, unit-norm embeddings).
Evaluation: P@1 and P@5 of ranking all 598 tags for each held-out package (big_embed.evaluate.text_evals).

    python -m big_embed.data.prepare debian_packages lee50 wordsim353 simlex999
    python -m big_embed.main --config configs/dexml_debtags.py --mode eval --workdir runs/dexml_debtags  # before
    python -m big_embed.main --config configs/dexml_debtags.py --workdir runs/dexml_debtags

Other modes: --config.loss.mode=softmax (multi-label InfoNCE) or topk (soft top-k).
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  args = cu.parse_arg(arg, tiny=False)
  c = cu.load_recipe(pathlib.Path(__file__).with_name("pretrained_minilm.py"), "sts")
  c.model.num_layers = 2
  c.model.max_text_len = 32
  c.data.tasks.debtags = cu.text_task(type="multilabel", dataset="debian_packages",
                                      fields={"text": "summary", "label": "tags"})
  c.loss = cu.loss("dexml", query_tower="query", label_tower="label", mode="decoupled",
                   temperature=0.05)
  c.train.update(dict(batch_size=64, steps=200, learning_rate=1e-4, warmup_steps=20, weight_decay=0.01,
                      log_every=20, eval_every=200, checkpoint_every=50))
  c.evals.debtags = dict(type="multilabel", dataset="debian_packages", text_field="summary", max_queries=2000)
  c.evals.sections = dict(type="linear_probe", dataset="debian_packages", text_field="summary",
                          label_field="section", max_train=3000, max_test=1000)
  if args.tiny:
    _make_tiny(c)
  return c


def _make_tiny(c):
  cu.make_tiny_text(c, steps=4)
  c.evals.debtags.max_queries = 64
  c.evals.sections.update(dict(max_train=200, max_test=100))
