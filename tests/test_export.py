"""Sentence-transformers checkpoints in and out: what a checkpoint's own files say is read (pooling, Dense,
normalisation, max_seq_length, prompts), and an exported model loads back with the same embeddings.

The reference is a BERT forward pass written here in NumPy on the Hugging Face tensor names and layouts, with the
text tokenised by the `tokenizers` library directly (truncation at max_seq_length, [CLS] ... [SEP]) and the
sentence-transformers pipeline (pooling, Dense, Normalize) applied by hand: nothing of big_embed's loading code.
"""

import functools
import json
import math
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tokenizers
from safetensors.numpy import load_file, save_file

from big_embed import config_schema, encode, export, models
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.models import st_modules
from big_embed.models import text_embedder as te
from big_embed.parallel import mesh as mesh_lib

H, HEADS, INTER, LAYERS, POSITIONS, EPS = 32, 4, 48, 2, 40, 1e-12
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "big", "red", "ball", "query", "doc",
         ":", "find", "me"]
TEXTS = ["the cat sat on the mat", "a dog ran far away", "big red ball", "cat", "", "the dog " * 30,
         "unknownword the cat"]


def word_tokenizer() -> tokenizers.Tokenizer:
  """A real `tokenizers` WordLevel tokenizer with BERT's special tokens and post-processor."""
  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
  return tok


def _hf_tensors(rng, vocab: int) -> dict[str, np.ndarray]:
  """Random BERT weights in Hugging Face names and layouts (Linear weights [out, in])."""
  t = {"embeddings.word_embeddings.weight": rng.normal(0, 0.5, (vocab, H)),
       "embeddings.position_embeddings.weight": rng.normal(0, 0.5, (POSITIONS, H)),
       "embeddings.token_type_embeddings.weight": rng.normal(0, 0.5, (2, H)),
       "embeddings.LayerNorm.weight": 1 + rng.normal(0, 0.1, H), "embeddings.LayerNorm.bias": rng.normal(0, 0.1, H)}
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    for name, (n_out, n_in) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                                "attention.self.value": (H, H), "attention.output.dense": (H, H),
                                "intermediate.dense": (INTER, H), "output.dense": (H, INTER)}.items():
      t[p + name + ".weight"] = rng.normal(0, 1 / math.sqrt(n_in), (n_out, n_in))
      t[p + name + ".bias"] = rng.normal(0, 0.1, n_out)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"] = 1 + rng.normal(0, 0.1, H)
      t[p + name + ".bias"] = rng.normal(0, 0.1, H)
  return {k: v.astype(np.float32) for k, v in t.items()}


def _naive_hf_bert(t: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Hugging Face BertModel's last hidden state, float64 NumPy: ids, mask [B, L] -> [B, L, H]."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPS) * t[name + ".weight"] + t[name + ".bias"]

  def lin(x, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]

  b, length = ids.shape
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = ln(x, "embeddings.LayerNorm")
  bias = np.where(mask, 0.0, -1e30)[:, None, None, :]
  d = H // HEADS
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, length, HEADS, d).transpose(0, 2, 1, 3)
               for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d) + bias
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    x = ln(x + lin((w @ v).transpose(0, 2, 1, 3).reshape(b, length, H), p + "attention.output.dense"),
           p + "attention.output.LayerNorm")
    m = lin(x, p + "intermediate.dense")
    x = ln(x + lin(0.5 * m * (1 + erf(m / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
  return x


def _reference(directory: pathlib.Path, texts, prompt: str = "") -> np.ndarray:
  """The sentence-transformers pipeline of `directory` by hand: [N, D] float64."""
  tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  modules = json.loads((directory / "modules.json").read_text())
  max_len = json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"]
  tok.enable_truncation(max_len)
  tok.enable_padding(pad_id=0, pad_token="[PAD]")
  enc = tok.encode_batch([prompt + t for t in texts])
  ids, mask = np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc]).astype(bool)
  x = _naive_hf_bert(load_file(str(directory / "model.safetensors")), ids, mask)
  for module in modules[1:]:
    kind, path = module["type"].rsplit(".", 1)[1], directory / module["path"]
    if kind == "Pooling":
      cfg = json.loads((path / "config.json").read_text())
      if cfg["pooling_mode_cls_token"]:
        x = x[:, 0]
      elif cfg.get("pooling_mode_lasttoken"):
        x = x[np.arange(len(x)), mask.sum(1) - 1]
      else:
        x = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    elif kind == "Dense":
      w = load_file(str(path / "model.safetensors"))
      x = x @ w["linear.weight"].T.astype(np.float64) + w.get("linear.bias", 0.0)
    elif kind == "Normalize":
      x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  return x


def _write_checkpoint(directory: pathlib.Path, *, pooling: str, dense_bias: bool | None, normalize: bool,
                      max_seq_length: int = 10, prompts=None, seed: int = 0) -> pathlib.Path:
  """A sentence-transformers checkpoint directory as sentence-transformers writes one."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  tok = word_tokenizer()
  tok.save(str(directory / "tokenizer.json"))
  save_file(_hf_tensors(rng, tok.get_vocab_size()), str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps({
      "model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu", "vocab_size": tok.get_vocab_size(),
      "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": INTER,
      "max_position_embeddings": POSITIONS, "type_vocab_size": 2, "layer_norm_eps": EPS}))
  modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
  (directory / "1_Pooling").mkdir()
  flags = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "last": "pooling_mode_lasttoken",
           "max": "pooling_mode_max_tokens"}
  (directory / "1_Pooling" / "config.json").write_text(json.dumps(
      {"word_embedding_dimension": H, **{flag: mode == pooling for mode, flag in flags.items()}}))
  if dense_bias is not None:
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (directory / "2_Dense").mkdir()
    (directory / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": H, "out_features": 12, "bias": dense_bias,
         "activation_function": "torch.nn.modules.linear.Identity"}))
    weights = {"linear.weight": rng.normal(0, 0.3, (12, H)).astype(np.float32)}
    if dense_bias:
      weights["linear.bias"] = rng.normal(0, 0.3, 12).astype(np.float32)
    save_file(weights, str(directory / "2_Dense" / "model.safetensors"))
  if normalize:
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  (directory / "modules.json").write_text(json.dumps(modules))
  (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                    "do_lower_case": False}))
  if prompts is not None:
    (directory / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
  return directory


@pytest.mark.parametrize("pooling,dense_bias,normalize", [("cls", True, True), ("last", None, False),
                                                          ("mean", False, True)])
def test_import_reads_pooling_dense_normalisation_and_max_length(tmp_path, capsys, pooling, dense_bias, normalize):
  ckpt = _write_checkpoint(tmp_path / "ckpt", pooling=pooling, dense_bias=dense_bias, normalize=normalize,
                           prompts={"query": "find me: ", "document": ""})
  model = encode.load(str(ckpt))
  printed = capsys.readouterr().out
  assert f"pooling={pooling}" in printed and "max_seq_length=10" in printed and f"normalize={normalize}" in printed
  assert model.max_len == 10 and model.query_prefix == "find me: "
  got = model.encode(TEXTS)
  np.testing.assert_allclose(got, _reference(ckpt, TEXTS), atol=2e-5)
  np.testing.assert_allclose(model.encode_queries(TEXTS), _reference(ckpt, TEXTS, "find me: "), atol=2e-5)
  assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5) == normalize
  # A training config that leaves the fields to the checkpoint gets the same ones, saved with the run.
  cfg = config_schema.model_defaults("text")
  cfg.pretrained = str(ckpt)
  resolved = models.resolve(cfg)
  assert (resolved.pooling, resolved.max_text_len, resolved.query_prefix) == (pooling, 10, "find me: ")
  assert (resolved.scaling_dim, resolved.embed_dim) == ((12, 0) if dense_bias else (0, 12) if dense_bias is False
                                                        else (0, 0))


def test_import_refuses_what_it_cannot_reproduce(tmp_path):
  ckpt = _write_checkpoint(tmp_path / "max", pooling="max", dense_bias=None, normalize=True)
  with pytest.raises(st_modules.PretrainedError, match=r"pooling \['pooling_mode_max_tokens'\] is not supported"):
    encode.load(str(ckpt))
  ckpt = _write_checkpoint(tmp_path / "dense", pooling="mean", dense_bias=True, normalize=True)
  cfg = config_schema.model_defaults("text")
  cfg.pretrained, cfg.embed_dim = str(ckpt), 8
  with pytest.raises(ConfigError, match="has its own Dense module"):
    models.resolve(cfg)
  config = json.loads((ckpt / "2_Dense" / "config.json").read_text())
  config["activation_function"] = "torch.nn.modules.activation.Tanh"
  (ckpt / "2_Dense" / "config.json").write_text(json.dumps(config))
  with pytest.raises(st_modules.PretrainedError, match="Dense activation .*Tanh.* is not supported"):
    st_modules.read(ckpt)


# ------------------------------------------------------------------------------------------------
# Export


def text_config(**overrides) -> ml_collections.ConfigDict:
  c = config_schema.model_defaults("text")
  c.bert = {"hidden_size": H, "num_layers": LAYERS, "num_heads": HEADS, "intermediate_size": INTER,
            "max_position_embeddings": POSITIONS}
  c.max_text_len = 12
  c.update(overrides)
  return c


def random_params(model, config, seed=0):
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), models.kind_of(config).example_batch(config))["params"])
  leaves, treedef = jax.tree.flatten(params)  # non-trivial LayerNorms and biases
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.lru_cache(maxsize=1)
def _mesh():
  return mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def embedder(model, params, tokenizer, config) -> encode.Embedder:
  """big_embed's own model in memory, as `encode.load` wraps a run."""
  return encode.Embedder(model, params, tokenizer, models.resolve(config), _mesh())


@pytest.mark.parametrize("overrides", [
    dict(pooling="cls", scaling_dim=16, query_prefix="query: ", doc_prefix="doc: ", scan_layers=True),
    dict(pooling="mean", embed_dim=8),
    dict(pooling="last"),
])
def test_export_round_trip(tmp_path, overrides):
  tokenizer = Tokenizer(word_tokenizer())
  config = text_config(**overrides)
  model = te.build_text_model(config, tokenizer.vocab_size)
  params = random_params(model, config)
  out = export.export_text_model(config, params, tokenizer, tmp_path / "exported")
  mine, back = embedder(model, params, tokenizer, config), encode.load(str(out))
  for role, prefix in (("query", overrides.get("query_prefix", "")), ("doc", overrides.get("doc_prefix", ""))):
    want = mine.encode(TEXTS, role=role)
    np.testing.assert_allclose(back.encode(TEXTS, role=role), want, atol=1e-5)
    # The files themselves, read by hand as sentence-transformers reads them.
    np.testing.assert_allclose(_reference(out, TEXTS, prefix), want, atol=2e-5)
  prompts = json.loads((out / "config_sentence_transformers.json").read_text())
  assert prompts["prompts"] == {"query": overrides.get("query_prefix", ""), "document": overrides.get("doc_prefix", "")}
  assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 12


def test_export_two_tower_text_side_composes_the_projections(tmp_path):
  ckpt = _write_checkpoint(tmp_path / "ckpt", pooling="cls", dense_bias=True, normalize=True, max_seq_length=10)
  tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json")))
  config = config_schema.model_defaults("two_tower")
  config.update(text_pretrained=str(ckpt), max_text_len=10, embed_dim=6, image_size=8, patch_size=4)
  config.vision.update(width=16, depth=1, mlp_dim=16, num_heads=2)
  model = models.kind_of(config).build(config, tokenizer.vocab_size)
  params = random_params(model, config)
  out = export.export_text_model(config, params, tokenizer, tmp_path / "exported")
  mine = embedder(model, params, tokenizer, config)
  np.testing.assert_allclose(encode.load(str(out)).encode(TEXTS), mine.encode(TEXTS), atol=1e-5)
  assert json.loads((out / "2_Dense" / "config.json").read_text())["out_features"] == 6
  images = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
  assert mine.encode_images(images).shape == (3, 6)

  config.text_pretrained = ""
  model = models.kind_of(config).build(config, tokenizer.vocab_size)
  with pytest.raises(ConfigError, match="pre-LayerNorm Transformer, which has no Hugging Face BERT equivalent"):
    export.export_text_model(config, random_params(model, config), tokenizer, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  with pytest.raises(ConfigError, match="exists and is not empty"):
    export.export_text_model(config, params, tokenizer, out)


@pytest.mark.slow
def test_export_cli_errors(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "big_embed.export", "--workdir", str(tmp_path / "nowhere"),
                         "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --workdir") and "is not a run" in proc.stderr
