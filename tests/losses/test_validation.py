"""Bad configs and bad inputs give clear errors; fully masked rows give documented finite values (no NaN)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_embed import losses
from big_embed.errors import ConfigError
from tests.losses import util

ENGINE_LOSSES = ("clip", "siglip", "softclip", "lightclip", "infonce", "peg", "teacher_kl", "dexml")

BAD_FIELDS = [
    ("clip", "temperature", 0.0), ("clip", "temperature", -0.07), ("clip", "max_logit_scale", 0.5),
    ("clip", "duplicates", "drop"), ("clip", "key_mode", "all"), ("clip", "tile_size", 0),
    ("clip", "towers", ("image",)),
    ("siglip", "temperature", 0.0), ("siglip", "duplicates", "merge"), ("siglip", "tile_size", -4),
    ("siglip", "max_logit_scale", float("nan")), ("softclip", "temperature", float("inf")),
    ("softclip", "alpha", 1.5), ("softclip", "target_temperature", 0.0), ("softclip", "beta", -1.0),
    ("softclip", "target_source_i2t", "roi"),
    ("lightclip", "soft_neg_mode", "hard"), ("lightclip", "schedule", "exp"), ("lightclip", "epsilon_max", 2.0),
    ("lightclip", "ramp_steps", 0), ("lightclip", "similarity_temperature", -1.0),
    ("infonce", "temperature", 0.0), ("infonce", "multi_positive", "max"), ("infonce", "fn_filter", "soft"),
    ("infonce", "fn_ratio", 1.5), ("infonce", "fn_scores", "oracle"), ("infonce", "duplicates", "keep"),
    ("peg", "peg_mode", "both"), ("peg", "gamma_max", -1.0), ("peg", "peg_ramp_steps", 0),
    ("peg", "temperature", -0.05),
    ("teacher_kl", "teacher_temperature", 0.0), ("teacher_kl", "teacher_source", "oracle"),
    ("teacher_kl", "hard_label_weight", -1.0), ("teacher_kl", "temperature", 0.0),
    ("dexml", "mode", "ovr"), ("dexml", "topk_k", 0), ("dexml", "topk_k", -3), ("dexml", "topk_alpha", 0.0),
    ("dexml", "topk_n_iter", 0), ("dexml", "topk_k_mode", "auto"), ("dexml", "temperature", -0.1),
]


@pytest.mark.parametrize("name,field,value", BAD_FIELDS)
def test_bad_config_field_is_named(name, field, value):
  with pytest.raises(ConfigError, match=rf"config\.loss\.{field}"):
    losses.loss_config(name, **{field: value})


@pytest.mark.parametrize("name", ENGINE_LOSSES)
def test_defaults_validate_and_are_registered(name):
  cfg = losses.loss_config(name)
  losses.get(name).validate(cfg)
  assert cfg.name == name and cfg.tile_size >= 1 and cfg.key_mode in ("gather", "ring", "local")


def test_teacher_filter_needs_per_row_negatives():
  with pytest.raises(ConfigError, match="hard_negatives_shared"):
    losses.loss_config("infonce", fn_filter="max", fn_scores="teacher", hard_negatives_shared=True)


def _trace(name, emb, batch, n=1, **overrides):
  cfg = losses.loss_config(name, **overrides)
  spec = losses.get(name)
  fn = spec.build(cfg, util.mesh(n))
  return jax.eval_shape(lambda: fn(emb, batch, spec.init_params(cfg), jnp.int32(0)))


def _pairs():
  _, a, t = util.pairs(90)
  return a, t


def test_mismatched_shapes():
  a, t = _pairs()
  with pytest.raises(ValueError, match=r"emb\['text'\] must be \[24, 8\]"):
    _trace("clip", {"image": a, "text": t[:, :6]}, {})
  with pytest.raises(ValueError, match=r"emb has no 'text'"):
    _trace("siglip", {"image": a}, {})
  with pytest.raises(ValueError, match=r"batch\['ids'\] must be \[24\]"):
    _trace("clip", {"image": a, "text": t}, {"ids": np.zeros((24, 2), np.int32)})
  with pytest.raises(ValueError, match=r"batch\['valid'\] must be \[24\]"):
    _trace("lightclip", {"image": a, "text": t}, {"valid": np.ones(23, bool)})
  with pytest.raises(ValueError, match="divisible by the 8 batch shards"):
    _trace("clip", {"image": a[:20], "text": t[:20]}, {}, n=8)
  with pytest.raises(ValueError, match=r"batch has no 'targets_i2t'"):
    _trace("softclip", {"image": a, "text": t}, {}, target_source_i2t="precomputed")
  hn = np.zeros((24, 3, 8), np.float32)
  with pytest.raises(ValueError, match=r"emb\['hard_negatives'\] must be \[24, \?, 8\]"):
    _trace("infonce", {"query": a, "key": t, "hard_negatives": hn[..., :5]}, {})
  with pytest.raises(ValueError, match=r"batch\['hard_negative_valid'\] must be \[24, 3\]"):
    _trace("infonce", {"query": a, "key": t, "hard_negatives": hn}, {"hard_negative_valid": np.ones((24, 2), bool)})
  with pytest.raises(ValueError, match=r"batch\['teacher_scores'\] must be \[24, 4\]"):
    _trace("teacher_kl", {"query": a, "key": t, "hard_negatives": hn}, {"teacher_scores": np.zeros((24, 3))})
  with pytest.raises(ValueError, match=r"batch has no 'positive_ids'"):
    _trace("dexml", {"query": a, "label": t}, {})
  with pytest.raises(ValueError, match=r"batch\['label_ids'\] must be \[24\]"):
    _trace("dexml", {"query": a, "label": t}, {"positive_ids": np.zeros((24, 1), np.int32),
                                               "label_ids": np.arange(5)})


def test_topk_k_outside_pool_is_rejected():
  a, t = _pairs()
  batch = {"positive_ids": np.zeros((24, 1), np.int32)}
  with pytest.raises(ConfigError, match=r"config.loss.topk_k must be in \(0, 24\)"):
    _trace("dexml", {"query": a, "label": t}, batch, mode="topk", topk_k=24)
  _trace("dexml", {"query": a, "label": t}, batch, mode="topk", topk_k=23)


# Fully masked rows: reuse the compiled functions of the naive-comparison tests (same configs and shapes).


def _finite(*trees):
  for tree in trees:
    for x in jax.tree.leaves(tree):
      assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("name", ["clip", "siglip", "softclip", "lightclip"])
def test_all_pairs_padded_gives_zero_loss(name):
  a, t = _pairs()
  batch = {"valid": np.zeros(24, bool)}
  if name in ("clip", "siglip"):
    batch["ids"] = np.arange(24, dtype=np.int32)
  loss, metrics, g_emb, g_params = util.run(name, 1, {"image": a, "text": t}, batch, tile_size=5, key_mode="gather")
  assert float(loss) == 0.0
  _finite(metrics, g_emb, g_params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_emb))


def test_single_valid_pair_has_no_negatives_but_is_finite():
  a, t = _pairs()
  valid = np.eye(24, dtype=bool)[4]
  loss, metrics, g_emb, g_params = util.run("softclip", 1, {"image": a, "text": t}, {"valid": valid},
                                            tile_size=5, key_mode="gather")
  assert abs(float(metrics["loss_neg"])) < 1e-6  # no negatives: neg-KL skipped
  assert abs(float(loss)) < 1e-5  # a single column: p = y = one-hot
  _finite(metrics, g_emb, g_params)


def test_infonce_all_negatives_masked_rows():
  from tests.losses.test_infonce import inputs
  emb, batch = inputs(91)
  batch["hard_negative_valid"] = np.zeros((24, 3), bool)
  batch["ids"] = np.zeros(24, np.int32)  # every other key is a duplicate (ignored): no negatives at all
  loss, metrics, g_emb, g_params = util.run("infonce", 1, emb, batch, tile_size=5, key_mode="gather")
  assert abs(float(loss)) < 1e-6 and float(metrics["negatives"]) == 0.0
  _finite(metrics, g_emb, g_params)


def test_dexml_rows_without_usable_positive_are_dropped():
  from tests.losses.test_dexml import inputs
  emb, batch = inputs(92)
  batch["positive_ids"] = np.full_like(batch["positive_ids"], 999)  # no positive is in the pool
  for mode in (None, "topk"):
    kw = dict(tile_size=5, key_mode="gather") if mode is None else dict(tile_size=5, key_mode="gather", mode="topk")
    loss, metrics, g_emb, g_params = util.run("dexml", 1, emb, batch, **kw)
    assert float(loss) == 0.0 and float(metrics["rows"]) == 0.0
    _finite(metrics, g_emb, g_params)
