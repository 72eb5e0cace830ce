"""AdamW with linear warmup and cosine decay; weight decay on matrices only."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, cfg.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)


def _decay_mask(params):
  """Decay kernels and embeddings (ndim >= 2) of the model; never norms, biases or loss params."""
  return {
      "model": jax.tree.map(lambda p: p.ndim >= 2, params["model"]),
      "loss": jax.tree.map(lambda p: False, params["loss"]),
  }


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """`cfg` is config.train."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=1e-8,
                  weight_decay=cfg.weight_decay, mask=_decay_mask),
  )
