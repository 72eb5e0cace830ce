"""Image and text towers with linear projections into a shared, L2-normalised embedding space (CLIP)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from big_embed.models import text as text_lib
from big_embed.models import vit as vit_lib


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class TwoTower(nn.Module):
  """`__call__(batch)` -> {"image": [B, E], "text": [B, E]}, float32, unit norm."""

  config: ml_collections.ConfigDict  # config.model
  vocab_size: int

  def setup(self):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    self.image_tower = vit_lib.ViT(image_size=c.image_size, patch_size=c.patch_size, dtype=dtype, **c.vision)
    if c.get("text_pretrained", ""):  # a pretrained BERT (mean-pooled) as the text side
      from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
      self.text_tower = text_embedder.build_text_model(pretrained_text_config(c), self.vocab_size)
    else:
      self.text_tower = text_lib.TextTransformer(vocab_size=self.vocab_size, max_len=c.max_text_len, dtype=dtype,
                                                 **c.text)
    proj = lambda name: nn.Dense(
        c.embed_dim, use_bias=False, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))
    self.image_proj = proj("image_proj")
    self.text_proj = proj("text_proj")

  def encode_image(self, images):  # uint8 [B, H, W, 3] -> [B, E]
    return l2_normalize(self.image_proj(self.image_tower(images)))

  def encode_text(self, tokens):  # int32 [B, L] -> [B, E]
    if self.config.get("text_pretrained", ""):
      return l2_normalize(self.text_proj(self.text_tower.features(tokens)))
    return l2_normalize(self.text_proj(self.text_tower(tokens)))

  def __call__(self, batch):
    return {"image": self.encode_image(batch["image"]), "text": self.encode_text(batch["text"])}


def pretrained_text_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The text side as a text model config, when `config.model.text_pretrained` names a BERT checkpoint ("minilm"
  or a Hugging Face directory; `text_pretrained_layers` > 0 keeps its first layers). The run then uses that
  checkpoint's tokenizer; `config.model.text` sizes are ignored."""
  from big_embed.models import text_embedder  # pylint: disable=g-import-not-at-top
  t = text_embedder.default_text_model_config()
  t.pretrained = model_config.text_pretrained
  t.num_layers = int(model_config.get("text_pretrained_layers", 0))
  t.max_text_len = model_config.max_text_len
  t.dtype = model_config.dtype
  return t


def example_batch(image_size: int, max_text_len: int) -> dict:
  """A one-row batch with the model's input shapes (for init and eval_shape)."""
  return {"image": jnp.zeros((1, image_size, image_size, 3), jnp.uint8),
          "text": jnp.zeros((1, max_text_len), jnp.int32)}


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int) -> TwoTower:
  return TwoTower(config=model_config, vocab_size=vocab_size)
