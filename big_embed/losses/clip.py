"""CLIP symmetric InfoNCE with a learnable temperature (Radford et al. 2021, arXiv 2103.00020; open_clip).

    ℓ = κ · A Bᵀ,  κ = exp(t)  (t = log(1/temperature), clamped to [0, log max_logit_scale] after every
                                optimizer update, as open_clip does; κ = 1/temperature when not learnable)
    L = ½ [ mean_i −log softmax_j(ℓ_ij)_{j=i}  +  mean_i −log softmax_j(ℓ_ji)_{j=i} ]

Tiled over the similarity engine, both directions from the same tiles of A Bᵀ (`infonce.symmetric_info_nce_local`:
`symmetric.lse_both` with its hand-written backward; one pass per direction on a ring over several devices):
local rows of each tower against all devices' keys of the other, never the B_g×B_g matrix; the global-batch
normalisation happens once. Equivalent to open_clip's `local_loss=True, gather_with_grad=True`.

Inputs:
  emb[towers[0]], emb[towers[1]]: [B, D] L2-normalised embeddings (pair i = row i of both).
  batch["valid"]: optional bool [B]; padded pairs are neither rows nor columns.
  batch["ids"]: optional int [B] item ids; another pair with the same id is not a negative: it is ignored
    (`duplicates="ignore"`) or counted as a positive (`"positive"`; the row then averages −log p over its
    positives, SupCon-style).
  batch["key_mask"]: optional bool [B, B]; True at (i, j): image i and text j are known to be related, so j is
    not a negative of i (nor i of j in the text → image direction).
Params: {"logit_scale": t} (none with a fixed temperature). Metrics: loss, loss per direction, accuracy (top-1
is a positive, averaged over the directions), logit_scale.
Relations: `infonce` is the one-directional, hard-negative version; `softclip` and `lightclip` replace the
one-hot target; `siglip` replaces the softmax by per-pair sigmoids.
"""

from __future__ import annotations

from big_embed.losses import common
from big_embed.losses import infonce


def _default_config():
  return dict(
      towers=("image", "text"),
      **common.scale_fields(0.07, True),
      duplicates="ignore",     # same batch["ids"]: "ignore" (not a negative) | "positive"
      **common.engine_fields(),
  )


def _validate(cfg):
  common.check_towers(cfg)
  common.check_scale(cfg)
  common.check_choice(cfg, "duplicates", infonce.DUPLICATES)
  common.check_engine(cfg)


def _inputs(cfg, emb, batch):
  return common.pair_inputs(cfg, emb, batch, key_mask=True)


def _local(cfg, s, r, shards):
  """Symmetric InfoNCE on the local shards of a, b [B_local, D] (inside shard_map)."""
  (loss_ab, m_ab), (loss_ba, m_ba) = infonce.symmetric_info_nce_local(
      s["a"], s["b"], shards=shards, scale=r["logit_scale"], valid=s.get("valid"), ids=s.get("ids"),
      duplicates=cfg.duplicates, tile_size=cfg.tile_size, key_mode=cfg.key_mode, key_mask=s.get("key_mask"),
      key_mask_t=s.get("key_mask_t"))
  loss = 0.5 * (loss_ab + loss_ba)
  return loss, {"loss": loss, "loss_a2b": loss_ab, "loss_b2a": loss_ba,
                "accuracy": 0.5 * (m_ab["accuracy"] + m_ba["accuracy"])}


SPEC = common.register_engine_loss("clip", _default_config, _validate, _inputs, _local)
