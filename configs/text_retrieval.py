"""Paraphrase retrieval, King James -> World English Bible, with InfoNCE over in-batch and MiniLM-mined hard negatives.

The model is a small text tower: the first 2 of all-MiniLM-L6-v2's 6 layers (mean pooling, unit norm), fine-tuned
with InfoNCE (τ = 0.05): each KJV verse must find its WEB rendering among every WEB verse of the global batch
plus one hard negative per row, mined with the full MiniLM (top-50, false negatives filtered by margins).

    python -m big_embed.data.prepare bible lee50 wordsim353 simlex999
    python -m big_embed.mine --config configs/text_retrieval.py --model minilm --name bible_minilm
    python -m big_embed.main --config configs/text_retrieval.py --mode eval --workdir runs/text_retrieval  # before
    python -m big_embed.main --config configs/text_retrieval.py --workdir runs/text_retrieval

Held-out books (the test split) are never trained on. Argument "tiny": a random-init 1-layer tower for tests.
"""

import pathlib

from big_embed import config_utils as cu


def get_config(arg=None):
  args = cu.parse_arg(arg, tiny=False)
  c = cu.load_recipe(pathlib.Path(__file__).with_name("pretrained_minilm.py"), "sts")
  c.model.num_layers = 2
  c.model.max_text_len = 64
  c.data.tasks.bible = cu.text_task(
      type="retrieval", dataset="bible", fields={"query": "kjv", "doc": "web"}, num_negatives=1,
      mined="bible_minilm", max_records=8000)
  c.loss = cu.loss("infonce", temperature=0.05)
  c.train.update(dict(batch_size=32, steps=150, learning_rate=1e-4, warmup_steps=15, weight_decay=0.01,
                      log_every=10, eval_every=150, checkpoint_every=50))
  c.evals.bible = dict(type="text_retrieval", dataset="bible", split="test", max_queries=1000, max_docs=5000,
                       msd_mode="sorted")
  if args.tiny:
    _make_tiny(c)
  return c


def _make_tiny(c):
  """A random-init 1-layer tower (MiniLM's tokenizer), no hard negatives, a few steps, small evals."""
  cu.make_tiny_text(c, steps=4)
  c.data.tasks.bible.update(dict(num_negatives=0, mined=""))
  c.evals.bible.update(dict(max_queries=64, max_docs=256))
