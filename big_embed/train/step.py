"""The train step: a pure function (state, batch) -> (state, metrics), compiled once with explicit shardings."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from big_embed.train import grad_cache
from big_embed.train.state import TrainState


def make_loss_and_grads(model: nn.Module, loss_fn: Callable) -> Callable:
  """`(params, batch, dropout_rng, step) -> ((loss, metrics), grads)`: the towers embed the global batch, the loss
  reads every device's rows against every device's columns; grads w.r.t. {"model": ..., "loss": ...}."""

  def loss_and_grads(params, batch, dropout_rng, step):
    def compute_loss(params):
      emb = model.apply({"params": params["model"]}, batch, rngs={"dropout": dropout_rng})
      return loss_fn(emb, batch, params["loss"], step)

    return jax.value_and_grad(compute_loss, has_aux=True)(params)

  return loss_and_grads


def all_finite(tree) -> jax.Array:
  """A bool scalar: every floating-point leaf of `tree` is finite (no NaN, no inf); reduced on the device."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def make_train_step(model: nn.Module, loss_fn: Callable, clamp_loss_params: Callable,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule, teacher=None,
                    chunking: grad_cache.Chunking | None = None):
  """Returns train_step(state, batch, teacher_params=None) -> (new_state, metrics).

  Towers embed the global batch (sharded over the batch axes) -> the loss reads every device's rows against
  every device's columns -> grads -> AdamW -> loss params clamped (e.g. CLIP temperature) after the update.
  With a `teacher` (train/teacher.py), its frozen embeddings of the batch are added to the batch first.
  `loss_fn(emb, batch, loss_params, step)` is built for one task type of text batches (`LossSpec.build`), so a
  run with several task types compiles one step per type.
  With a `chunking` (config.train.embed_chunk_size > 0) the towers embed the batch chunk by chunk with exact
  gradient caching (`grad_cache`), the teacher too; the loss still sees the whole global batch.

  The NaN guard, inside the step (no host sync): the update is applied only when the loss, the gradient norm and
  every leaf of the updated parameters and optimizer state are finite (the last catches an update that overflows
  from finite gradients, e.g. a huge learning rate). Otherwise the step is skipped: the new state keeps the old
  parameters and optimizer state bit for bit (so the optimizer's own count, which drives Adam's bias correction,
  does not advance), while `step` still advances, so the data stream moves on, the next step draws other dropout
  masks and a resumed run replays exactly. `metrics["skipped"]` is 1.0 for a skipped step, else 0.0; the loop
  stops the run after config.train.max_bad_steps consecutive skips.
  """

  if chunking is None:
    loss_and_grads = make_loss_and_grads(model, loss_fn)
  else:
    loss_and_grads = grad_cache.make_cached_loss_and_grads(model, loss_fn, chunking)

  def train_step(state: TrainState, batch: dict, teacher_params=None):
    if teacher is not None:
      batch = teacher.annotate(teacher_params, batch, chunking)
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    (loss, metrics), grads = loss_and_grads(state.params, batch, dropout_rng, state.step)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = {**params, "loss": clamp_loss_params(params["loss"])}
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((params, opt_state))
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), (params, opt_state),
                                     (state.params, state.opt_state))
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
               "skipped": 1 - ok.astype(jnp.float32)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

  return train_step
