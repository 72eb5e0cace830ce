"""Quickstart: a small CLIP (ViT + Transformer) on emoji pairs and captioned Fashion-MNIST, a few minutes on 2 CPU cores.

    python -m big_embed.data.prepare emoji fashion_mnist
    python -m big_embed.main --config configs/quickstart.py --workdir runs/quickstart
"""

import ml_collections

from big_embed import losses
from big_embed.data import pipeline


def get_config(arg=None):
  """`arg`: None for the quickstart run; "tiny" for a seconds-long smoke run (tests)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Mesh axes; -1 takes the remaining devices. The batch is split over data x fsdp.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.data = pipeline.default_data_config()  # data_dir, mixture, max_text_len, worker_count, num_threads, …
  c.data.mixture = ml_collections.ConfigDict({"emoji": 0.5, "fashion_mnist": 0.5})

  c.model = ml_collections.ConfigDict()
  c.model.image_size = 32
  c.model.patch_size = 8  # 4x4 = 16 image tokens
  c.model.max_text_len = c.data.get_ref("max_text_len")
  c.model.embed_dim = 128
  c.model.dtype = "float32"
  c.model.vision = ml_collections.ConfigDict(dict(width=96, depth=4, num_heads=4, mlp_dim=384))
  c.model.text = ml_collections.ConfigDict(dict(width=128, depth=2, num_heads=4, mlp_dim=512))

  c.loss = losses.loss_config("clip")

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256
  c.train.steps = 500
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.final_lr_fraction = 0.0
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.grad_clip_norm = 1.0
  c.train.log_every = 25
  c.train.eval_every = 250
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2

  c.eval_batch_size = 512
  c.evals = ml_collections.ConfigDict()
  c.evals.fashion_mnist = ml_collections.ConfigDict(dict(type="zero_shot", dataset="fashion_mnist", split="test"))
  c.evals.emoji = ml_collections.ConfigDict(dict(type="retrieval", dataset="emoji", split="test"))
  if arg == "tiny":
    _make_tiny(c)
  elif arg:
    raise ValueError(f"configs/quickstart.py takes no argument or 'tiny', got {arg!r}")
  return c


def _make_tiny(c):
  c.data.max_text_len = 8
  c.model.image_size = 16
  c.model.patch_size = 8
  c.model.embed_dim = 16
  for tower in (c.model.vision, c.model.text):
    tower.width, tower.depth, tower.num_heads, tower.mlp_dim = 32, 1, 2, 64
  c.train.batch_size = 16
  c.train.steps = 6
  c.train.warmup_steps = 2
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.checkpoint_every = 2
  c.eval_batch_size = 256
