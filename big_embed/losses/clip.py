"""CLIP symmetric InfoNCE with a learnable temperature (Radford et al. 2021, arXiv 2103.00020; open_clip).

    ℓ = κ · A Bᵀ,  κ = exp(t)  (t = log(1/temperature_init), clamped to [0, log max_logit_scale] after
                                every optimizer update, as open_clip does)
    L = ½ [ mean_i −log softmax_j(ℓ_ij)_{j=i}  +  mean_i −log softmax_j(ℓ_ji)_{j=i} ]

Tiled over the similarity engine (`engine.info_nce_local` in both directions): local rows of each tower
against all devices' keys of the other (all-gathered or a ppermute ring), never the B_g×B_g matrix; the
global-batch normalisation happens once. Equivalent to open_clip's `local_loss=True, gather_with_grad=True`.

Inputs:
  emb[towers[0]], emb[towers[1]]: [B, D] L2-normalised embeddings (pair i = row i of both).
  batch["valid"]: optional bool [B]; padded pairs are neither rows nor columns.
  batch["ids"]: optional int [B] item ids; another pair with the same id is not a negative: it is ignored
    (`duplicates="ignore"`) or counted as a positive (`"positive"`; the row then averages −log p over its
    positives, SupCon-style).
Params: {"logit_scale": t}. Metrics: loss, loss per direction, accuracy (top-1 is a positive), logit_scale.
Relations: `infonce` is the one-directional, hard-negative version; `softclip` and `lightclip` replace the
one-hot target; `siglip` replaces the softmax by per-pair sigmoids.
"""

from __future__ import annotations

from big_embed.losses import common
from big_embed.losses import engine
from big_embed.losses import registry


def _default_config():
  return dict(
      towers=("image", "text"),
      temperature_init=0.07,   # logit scale t = log(1/T) is learnable
      learnable_temperature=True,
      max_logit_scale=100.0,   # clamp exp(t) to [1, max] after each update (open_clip)
      duplicates="ignore",     # same batch["ids"]: "ignore" (not a negative) | "positive"
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)
  common.check_choice(cfg, "duplicates", engine.DUPLICATES)
  common.check_engine(cfg)


def clip_loss_local(a, b, *, shards, scale, valid=None, ids=None, duplicates="ignore", tile_size=1024,
                    key_mode="gather"):
  """Symmetric InfoNCE on local shards a, b [B_local, D] (inside shard_map). Returns (loss, metrics)."""
  kw = dict(shards=shards, scale=scale, valid=valid, ids=ids, duplicates=duplicates, tile_size=tile_size,
            key_mode=key_mode)
  loss_ab, m_ab = engine.info_nce_local(a, b, **kw)
  loss_ba, m_ba = engine.info_nce_local(b, a, **kw)
  loss = 0.5 * (loss_ab + loss_ba)
  return loss, {"loss": loss, "loss_a2b": loss_ab, "loss_b2a": loss_ba,
                "accuracy": 0.5 * (m_ab["accuracy"] + m_ba["accuracy"])}


def _build(cfg, mesh):

  def loss_fn(emb, batch, loss_params, step):
    del step
    scale = common.logit_scale(cfg, loss_params)
    inputs = common.pair_inputs(cfg, emb, batch)

    def local(s, r, shards):
      return clip_loss_local(s["a"], s["b"], shards=shards, scale=r["scale"], valid=s.get("valid"),
                             ids=s.get("ids"), duplicates=cfg.duplicates, tile_size=cfg.tile_size,
                             key_mode=cfg.key_mode)

    loss, metrics = engine.shard(local, mesh, inputs, {"scale": scale})
    return loss, {**metrics, "logit_scale": scale}

  return loss_fn


SPEC = registry.register(registry.LossSpec(
    name="clip", build=_build, default_config=_default_config, init_params=common.init_scale,
    clamp_params=common.clamp_scale, validate=_validate))
