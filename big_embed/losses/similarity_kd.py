"""Logit distillation over in-batch similarities: a wrapper that turns two-tower embeddings into logits.

Logit-level distillation losses (`logit_kd`, `sinkd`, `repcon_kd`) compare a student's and a teacher's logits
[B, C]. For an embedding model the natural logits are the in-batch similarity rows (CLIP-KD's "interactive"
logits): row i scores item i of tower A against every item of tower B,

    emb["logits"]           = (1/τ) · Â Bᵀ            [B_g, B_g]   student (towers)
    batch["teacher_logits"] = (1/τ) · Â_T B_Tᵀ        [B_g, B_g]   teacher (teacher_keys, stop-gradient)
    batch["label"]          = arange(B_g)                            row i's own pair, for SinKD's CE term

and the inner loss runs on them. The matrix is the full global B_g × B_g (not tiled): use it for the modest
batches of distillation runs, not for huge-negative pre-training.

Config fields: inner (the logit loss's sub-config), towers (student emb keys A, B), teacher_keys (batch keys
of the teacher's embeddings, see `train/teacher.py`), temperature (fixed: scale = 1/τ; the inner loss's own
`temperature` is the distillation temperature applied to these logits).
"""

from __future__ import annotations

import jax.numpy as jnp

from big_embed.losses import common
from big_embed.losses import registry


def _default_config():
  return dict(
      inner={"name": "logit_kd"},  # resolved with the logit_kd loss's defaults
      towers=("image", "text"),
      teacher_keys=("teacher_image", "teacher_text"),
      temperature=0.05,            # τ of the similarity logits (fixed): scale 1/τ = 20
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_towers(cfg, "teacher_keys")
  common.check_positive(cfg, "temperature")


def _build(cfg, mesh, task=None):
  inner_fn = registry.build_inner(cfg, mesh, task)
  a_key, b_key = cfg.towers
  ta_key, tb_key = cfg.teacher_keys
  scale = 1.0 / cfg.temperature

  def loss_fn(emb, batch, loss_params, step):
    missing = [k for k in (ta_key, tb_key) if k not in batch]
    if missing:
      raise ValueError(f"similarity_kd: batch has no teacher embeddings {missing}; set config.teacher.workdir or "
                       "config.teacher.pretrained")
    a, b = emb[a_key].astype(jnp.float32), emb[b_key].astype(jnp.float32)
    ta, tb = batch[ta_key].astype(jnp.float32), batch[tb_key].astype(jnp.float32)
    logits = scale * a @ b.T  # [B_g, B_g]
    teacher_logits = scale * ta @ tb.T  # [B_g, B_g]
    batch = {**batch, "teacher_logits": teacher_logits, "label": jnp.arange(a.shape[0], dtype=jnp.int32)}
    return inner_fn({**emb, "logits": logits}, batch, loss_params, step)

  return loss_fn


SPEC = registry.wrapper("similarity_kd", _build, _default_config, _validate)
