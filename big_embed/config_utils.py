"""Helpers for recipe files: build one recipe on top of another."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def load_recipe(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the recipe file at `path` (e.g. a sibling: `Path(__file__).with_name(...)`)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"big_embed_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def make_tiny_text(c: ml_collections.ConfigDict, steps: int = 4) -> None:
  """Shrinks a text recipe for tests: a random-init 1-layer BERT (the pretrained model's tokenizer, so MiniLM's
  must be installed), 16-token texts, batch 16, `steps` steps and small evaluation batches."""
  c.model.pretrained = ""
  c.model.num_layers = 1
  c.model.bert.update(dict(hidden_size=32, num_heads=2, intermediate_size=64))
  c.model.max_text_len = 16
  c.train.update(dict(batch_size=16, steps=steps, warmup_steps=1, log_every=2, eval_every=steps,
                      checkpoint_every=2))
  c.eval_batch_size = 64
