"""Image and text towers with linear projections into a shared, L2-normalised embedding space (CLIP).

The image side is a ViT, the text side a Transformer (or a pretrained BERT, `text_pretrained`); both compute in
`config.model.dtype` with float32 params, and the projections and embeddings are float32. Dropout (the towers'
`dropout` / `attention_dropout`) is on when a "dropout" RNG is given to `apply`, row-keyed (`models.dropout`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from big_embed import config_schema
from big_embed.models import dropout as dropout_lib
from big_embed.models import layers
from big_embed.models import text as text_lib
from big_embed.models import text_embedder
from big_embed.models import vit as vit_lib
from big_embed.models.kind import ModelKind
from big_embed.ops import l2_normalize

OUTPUTS = ("image", "text")  # also the inputs, in the order of their dropout sites
TOWER_DROPOUTS = ("dropout", "attention_dropout")  # the dropout fields of config.model.vision / .text


class TwoTower(nn.Module):
  """`__call__(batch)` -> {"image": [B, E], "text": [B, E]}, float32, unit norm."""

  config: ml_collections.ConfigDict  # config.model (config_schema.TWO_TOWER_MODEL)
  vocab_size: int

  def setup(self):
    c = self.config
    tower = {"dtype": jnp.dtype(c.dtype), **layers.stack_fields(c)}
    self.image_tower = vit_lib.ViT(image_size=c.image_size, patch_size=c.patch_size, **tower, **c.vision)
    if c.get("text_pretrained", ""):  # a pretrained BERT (pooled as its checkpoint says) as the text side
      self.text_tower = text_embedder.build_text_model(pretrained_text_config(c), self.vocab_size)
    else:
      self.text_tower = text_lib.TextTransformer(vocab_size=self.vocab_size, max_len=c.max_text_len, **tower,
                                                 **c.text)
    proj = lambda name: nn.Dense(
        c.embed_dim, use_bias=False, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))
    self.image_proj = proj("image_proj")
    self.text_proj = proj("text_proj")

  def encode_image(self, images, rows=None):  # uint8 [B, H, W, 3] -> float32 [B, E]; rows: dropout RowKeys
    return l2_normalize(self.image_proj(self.image_tower(images, rows)))

  def encode_text(self, tokens, rows=None):  # int32 [B, L] -> float32 [B, E]; rows: dropout RowKeys
    if self.config.get("text_pretrained", ""):
      return l2_normalize(self.text_proj(self.text_tower.features(tokens, rows)))
    return l2_normalize(self.text_proj(self.text_tower(tokens, rows)))

  def __call__(self, batch, row_ids=None):
    """{"image": uint8 [N, H, W, 3], "text": int32 [N, L], ...} -> {"image": [N, E], "text": [N, E]}.

    `row_ids` int32 [N]: the global index of each row (None: 0..N-1). With a "dropout" RNG, row r's masks depend
    only on that RNG, the side and row_ids[r], so any split of the batch into chunks embeds every row alike.
    """
    call_key = dropout_lib.call_key(self)
    rows = {name: dropout_lib.row_keys(call_key, row_ids, batch[name].shape[0], site)
            for site, name in enumerate(OUTPUTS)}
    return {"image": self.encode_image(batch["image"], rows["image"]),
            "text": self.encode_text(batch["text"], rows["text"])}


def pretrained_text_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The text side as a text model config, when `config.model.text_pretrained` names a BERT checkpoint ("minilm"
  or a Hugging Face directory; `text_pretrained_layers` > 0 keeps its first layers). The run then uses that
  checkpoint's tokenizer; `config.model.text` sizes are ignored, and its `dropout` is BERT's (hidden and
  attention, as in Hugging Face)."""
  t = config_schema.model_defaults("text")
  t.pretrained = model_config.text_pretrained
  t.num_layers = int(model_config.get("text_pretrained_layers", 0))
  t.max_text_len = model_config.max_text_len
  t.dtype = model_config.dtype
  t.dropout = model_config.text.get("dropout", 0.0)
  t.update(layers.stack_fields(model_config))
  return text_embedder.resolve_config(t)


def example_batch(model_config: ml_collections.ConfigDict) -> dict:
  """A one-row batch with the model's input shapes (for init and eval_shape)."""
  size = model_config.image_size
  return {"image": jnp.zeros((1, size, size, 3), jnp.uint8),
          "text": jnp.zeros((1, model_config.max_text_len), jnp.int32)}


def build_model(model_config: ml_collections.ConfigDict, vocab_size: int) -> TwoTower:
  """The model of `config.model`; config errors are raised now, not at the first trace.

  Raises:
    ConfigError: a dropout rate outside [0, 1), or a bad remat / scan_layers.
  """
  layers.stack_fields(model_config)
  for tower in ("vision", "text"):
    for field in TOWER_DROPOUTS:
      dropout_lib.check_rate(model_config[tower].get(field, 0.0), f"config.model.{tower}.{field}")
  return TwoTower(config=model_config, vocab_size=vocab_size)


KIND = ModelKind(
    name="two_tower", build=build_model, example_batch=example_batch, outputs=OUTPUTS,
    pretrained_source=lambda c: c.get("text_pretrained", ""),
    pretrained_params=lambda c: {"text_tower": text_embedder.pretrained_model_params(pretrained_text_config(c))},
    tokenizer_source=lambda c: c.get("text_pretrained", ""),
    announce=lambda c: text_embedder.announce_config(pretrained_text_config(c)) if c.get("text_pretrained") else None)
