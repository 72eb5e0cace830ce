"""Mixed precision (`config.model.dtype="bfloat16"`): the towers compute in bf16, the parameters, optimizer state,
embeddings, similarities and losses stay float32; the bf16 loss and gradients are within the stated bound of the
float32 step on the same batch and parameters.

The bound we guarantee (README, "Huge batches"), for the 2-block towers here: the loss within 0.5 % relative of
the float32 loss, the whole parameter gradient within 5 % relative L2, and every parameter's gradient (those
above 1e-3 of the whole gradient's norm: an attention key bias has true gradient 0, so both sides are noise)
with cosine similarity >= 0.995 to the float32 one. Measured: loss 0.13 % / 0.006 % (two-tower / text), gradient
1.6 % / 0.9 %, cosines >= 0.998. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2 %); the embeddings
carry a few of these roundings per layer, and the loss then only sees float32 numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import config_schema
from big_embed import config_utils as cu
from big_embed import losses
from big_embed import models

VOCAB = 64


def _two_tower():
  c = config_schema.base_config("two_tower")
  c.model.update(dict(image_size=16, patch_size=4, max_text_len=8, embed_dim=32))
  for tower in (c.model.vision, c.model.text):
    tower.update(dict(width=32, depth=2, num_heads=2, mlp_dim=64))
  c.loss = cu.loss("clip")
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, size=(32, 16, 16, 3)).astype(np.uint8),
           "text": rng.integers(1, VOCAB, size=(32, 8)).astype(np.int32)}
  return c, batch


def _text():
  c = config_schema.base_config("text")
  c.model.max_text_len = 8
  c.model.bert.update(dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
  c.loss = cu.loss("infonce")
  rng = np.random.default_rng(1)
  batch = {"query": rng.integers(1, VOCAB, size=(32, 8)).astype(np.int32),
           "key": rng.integers(1, VOCAB, size=(32, 8)).astype(np.int32),
           "ids": np.arange(32, dtype=np.int32)}
  return c, batch


def _naive_loss(cfg, emb, loss_params):
  """The float64 NumPy loss of the (float32) embeddings: symmetric CLIP for the two-tower config, q -> k InfoNCE
  (distinct ids) for the text one."""
  def lse(x):
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]

  if "image" in emb:
    a, b = (np.asarray(emb[k], np.float64) for k in ("image", "text"))
    logits = np.exp(float(loss_params["logit_scale"])) * a @ b.T
    return float(np.mean(lse(logits) + lse(logits.T)) / 2 - np.mean(np.diag(logits)))
  q, k = (np.asarray(emb[n], np.float64) for n in ("query", "key"))
  logits = q @ k.T / 0.05
  return float(np.mean(lse(logits) - np.diag(logits)))


def _loss_and_grads(cfg, dtype, params, batch):
  cfg = cfg.copy_and_resolve_references()
  cfg.model.dtype = dtype
  model = models.kind_of(cfg.model).build(cfg.model, VOCAB)
  loss_cfg = losses.resolve(cfg.loss)
  spec = losses.get(loss_cfg.name)
  loss_fn = spec.build(loss_cfg, None)

  def f(p):
    emb = model.apply({"params": p["model"]}, batch)
    return loss_fn(emb, batch, p["loss"], 0)[0], emb

  (loss, emb), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  return loss, emb, grads, spec.init_params(loss_cfg)


@pytest.mark.parametrize("make", [_two_tower, _text], ids=["two_tower", "text"])
def test_bf16_step_is_within_the_bound_of_float32(make):
  cfg, batch = make()
  model = models.kind_of(cfg.model).build(cfg.model, VOCAB)
  model_params = jax.device_get(model.init(jax.random.PRNGKey(0), batch)["params"])
  loss_params = losses.get(losses.resolve(cfg.loss).name).init_params(losses.resolve(cfg.loss))
  params = {"model": model_params, "loss": loss_params}

  loss32, emb32, g32, _ = _loss_and_grads(cfg, "float32", params, batch)
  loss16, emb16, g16, _ = _loss_and_grads(cfg, "bfloat16", params, batch)
  # What leaves the towers is float32 (the losses never see bf16) and the params stay float32.
  assert all(e.dtype == jnp.float32 for e in emb16.values())
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
  assert loss16.dtype == jnp.float32
  # ... and the loss of the bf16 towers' embeddings is computed in float32: it equals the float64 loss of those
  # embeddings to float32 rounding (bf16 logits would be off by ~1e-3).
  np.testing.assert_allclose(float(loss16), _naive_loss(cfg, emb16, params["loss"]), rtol=2e-6)
  # The towers really computed in bf16: their embeddings differ from float32 at bf16's scale, not float32's.
  diff = max(float(jnp.max(jnp.abs(emb16[k] - emb32[k]))) for k in emb32)
  assert 1e-4 < diff < 0.1, diff

  assert abs(float(loss16) - float(loss32)) <= 0.005 * abs(float(loss32)), (float(loss16), float(loss32))
  flat32, flat16 = jax.tree.leaves(g32), jax.tree.leaves(g16)
  num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(flat32, flat16))
  den = sum(float(jnp.sum(a ** 2)) for a in flat32)
  assert np.sqrt(num / den) <= 0.05, np.sqrt(num / den)
  paths = jax.tree_util.tree_flatten_with_path(g32)[0]
  checked = 0
  for (path, a), b in zip(paths, flat16):
    if float(jnp.linalg.norm(a)) > 1e-3 * np.sqrt(den):
      cos = float(jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
      assert cos >= 0.995, (jax.tree_util.keystr(path), cos)
      checked += 1
  assert checked >= len(paths) // 2
