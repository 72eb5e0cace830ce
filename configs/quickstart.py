"""Quickstart: a small CLIP (ViT + Transformer) on emoji pairs and captioned Fashion-MNIST, minutes on 2 CPU cores.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m big_embed.main --config configs/quickstart.py --workdir runs/quickstart

The model, optimizer and schedule are the schema's defaults (`big_embed/config_schema.py`): a 4-block ViT on 32 px
images (16 patches) and a 2-block text Transformer, 128-d embeddings, AdamW at 1e-3, 500 steps of batch 256.
Argument "tiny": a seconds-long smoke run (tests).
"""

from big_embed import config_utils as cu


def get_config(arg=None):
  args = cu.parse_arg(arg, tiny=False)
  c = cu.base_config("two_tower")
  c.data.mixture = {"emoji": 0.5, "fashion_mnist": 0.5}
  c.loss = cu.loss("clip", temperature=0.07, learnable_temperature=True, max_logit_scale=100.0)
  c.evals.fashion_mnist = dict(type="zero_shot", dataset="fashion_mnist", split="test")
  c.evals.emoji = dict(type="retrieval", dataset="emoji", split="test")
  if args.tiny:
    _make_tiny(c)
  return c


def _make_tiny(c):
  c.model.update(dict(image_size=16, patch_size=8, max_text_len=8, embed_dim=16))
  for tower in (c.model.vision, c.model.text):
    tower.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  c.train.update(dict(batch_size=16, steps=6, warmup_steps=2, log_every=2, eval_every=6, checkpoint_every=2))
  c.eval_batch_size = 256
