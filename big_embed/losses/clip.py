"""CLIP symmetric InfoNCE with global in-batch negatives (Radford et al. 2021; open_clip `ClipLoss`).

Every device's rows see every device's columns: inside `shard_map`, the local queries ([B_local, D]) are
scored against all-gathered keys ([B_g, D]); labels are offset by the shard index; the loss sum is
`psum`-ed and divided by the global batch once (open_clip's `local_loss=True, gather_with_grad=True`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from big_embed.losses import registry
from big_embed.parallel.mesh import BATCH_AXES


def _default_config():
  return dict(
      towers=("image", "text"),
      temperature_init=0.07,   # logit scale t = log(1/T) is learnable
      learnable_temperature=True,
      max_logit_scale=100.0,   # clamp exp(t) to [1, max] after each update (open_clip)
  )


def _validate(cfg):
  if not cfg.temperature_init > 0:
    raise ValueError(f"config.loss.temperature_init must be > 0, got {cfg.temperature_init}")
  if not cfg.max_logit_scale >= 1:
    raise ValueError(f"config.loss.max_logit_scale must be >= 1, got {cfg.max_logit_scale}")


def _init_params(cfg):
  return {"logit_scale": jnp.asarray(np.log(1.0 / cfg.temperature_init), jnp.float32)}


def _clamp_params(cfg, params):
  return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, np.log(cfg.max_logit_scale))}


def _build(cfg, mesh):
  a_key, b_key = cfg.towers
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)

  def local_loss(a, b, t):  # a, b: [B_local, D]
    b_local = a.shape[0]
    a_all = lax.all_gather(a, axes, tiled=True)  # [B_g, D]
    b_all = lax.all_gather(b, axes, tiled=True)  # [B_g, D]
    labels = lax.axis_index(axes) * b_local + jnp.arange(b_local)  # [B_local]
    scale = jnp.exp(t)
    logits_ab = scale * a @ b_all.T  # [B_local, B_g]
    logits_ba = scale * b @ a_all.T  # [B_local, B_g]
    pos = scale * jnp.sum(a * b, axis=-1)  # [B_local]
    nll_ab = jax.nn.logsumexp(logits_ab, axis=-1) - pos
    nll_ba = jax.nn.logsumexp(logits_ba, axis=-1) - pos
    n_global = b_local * lax.psum(1, axes)
    loss = lax.psum(jnp.sum(nll_ab + nll_ba), axes) / (2 * n_global)
    correct = (jnp.argmax(logits_ab, -1) == labels).astype(jnp.float32)
    correct += (jnp.argmax(logits_ba, -1) == labels).astype(jnp.float32)
    acc = lax.psum(jnp.sum(correct), axes) / (2 * n_global)
    return loss, acc

  sharded = jax.shard_map(
      local_loss, mesh=mesh, in_specs=(P(axes), P(axes), P()), out_specs=(P(), P()))

  def loss_fn(emb, batch, loss_params, step):
    del batch, step
    t = loss_params["logit_scale"]
    if not cfg.learnable_temperature:
      t = lax.stop_gradient(t)
    a = emb[a_key].astype(jnp.float32)
    b = emb[b_key].astype(jnp.float32)
    loss, acc = sharded(a, b, t)
    return loss, {"loss": loss, "accuracy": acc, "logit_scale": jnp.exp(t)}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="clip", build=_build, default_config=_default_config, init_params=_init_params,
    clamp_params=_clamp_params, validate=_validate))
