"""The sentence-transformers files of a checkpoint directory: what its pipeline after the transformer does.

A sentence-transformers model directory is a Hugging Face model (`config.json`, `model.safetensors`,
`tokenizer.json`) plus files that say how token states become one embedding:

    modules.json                          [Transformer (path ""), Pooling, Dense*, Normalize?] in order
    sentence_bert_config.json             {"max_seq_length": 256, "do_lower_case": false}
    <pooling dir>/config.json             {"word_embedding_dimension": H, "pooling_mode_mean_tokens": true, ...}
    <dense dir>/config.json               {"in_features", "out_features", "bias", "activation_function"}
    <dense dir>/model.safetensors         linear.weight [out, in] (, linear.bias [out])
    config_sentence_transformers.json     {"prompts": {"query": ..., "document": ...}, "default_prompt_name": ...,
                                           "similarity_fn_name": "cosine"}

`read(path)` turns them into a `Pipeline` (what big_embed's text model reproduces: mean / CLS / last-token pooling,
at most one Dense with identity activation, an optional Normalize; anything else is a `PretrainedError` naming the
module, never a silent approximation); `write(path, pipeline, ...)` writes them for a model big_embed exports. The
Hugging Face part (BERT weights, tokenizer) is `models.pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from big_embed.models.pretrained import PretrainedError

MODULES_FILE = "modules.json"
BERT_CONFIG_FILE = "sentence_bert_config.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
_TYPE = "sentence_transformers.models."
_IDENTITY = ("torch.nn.modules.linear.Identity", "torch.nn.Identity", "Identity", "")
# Pooling config flag -> big_embed pooling; the other flags of sentence-transformers' Pooling are not reproduced.
_POOLING_FLAGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_lasttoken": "last"}
_OTHER_POOLING_FLAGS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens")


@dataclasses.dataclass(frozen=True)
class Dense:
  """A Dense module: y = x @ kernel (+ bias); kernel float32 [in, out], bias [out] or None."""
  kernel: np.ndarray
  bias: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """How a checkpoint's token states become its embedding, and how texts are cut and prompted.

  `source` says where each value came from (a file, or "default" when the checkpoint has no such file), for the
  one line `describe()` prints.
  """
  pooling: str = "mean"  # "mean" over non-pad tokens, "cls" (the first token) or "last" (the last non-pad token)
  dense: Dense | None = None
  normalize: bool = True
  max_seq_length: int | None = None  # None: the checkpoint does not say
  query_prompt: str = ""
  doc_prompt: str = ""
  source: str = "default"

  def describe(self, name: str) -> str:
    dense = "none" if self.dense is None else (f"{self.dense.kernel.shape[0]} -> {self.dense.kernel.shape[1]}"
                                               f"{' with bias' if self.dense.bias is not None else ''}")
    return (f"pretrained {name}: pooling={self.pooling}, dense={dense}, normalize={self.normalize}, "
            f"max_seq_length={self.max_seq_length or 'not set'}, query prompt={self.query_prompt!r}, "
            f"document prompt={self.doc_prompt!r} (read from {self.source})")


def _json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise PretrainedError(f"cannot read {path} ({e}); rewrite or remove it") from e


def _pooling(directory: pathlib.Path) -> str:
  cfg = _json(directory / "config.json")
  modes = [mode for flag, mode in _POOLING_FLAGS.items() if cfg.get(flag)]
  others = [flag for flag in _OTHER_POOLING_FLAGS if cfg.get(flag)]
  if others or len(modes) != 1:
    raise PretrainedError(f"{directory / 'config.json'}: pooling {modes + others or 'none'} is not supported; "
                          f"big_embed reproduces exactly one of {sorted(set(_POOLING_FLAGS.values()))}")
  if cfg.get("include_prompt", True) is False:
    raise PretrainedError(f"{directory / 'config.json'}: include_prompt=false (prompt tokens left out of the "
                          "pooling) is not supported")
  return modes[0]


def _dense(directory: pathlib.Path) -> Dense:
  cfg = _json(directory / "config.json")
  activation = cfg.get("activation_function", "")
  if activation not in _IDENTITY:
    raise PretrainedError(f"{directory / 'config.json'}: Dense activation {activation!r} is not supported (only "
                          "the identity)")
  weights = directory / "model.safetensors"
  if not weights.is_file():
    raise PretrainedError(f"{directory} has no model.safetensors (a pytorch_model.bin cannot be read without "
                          "PyTorch); re-save the model with a recent sentence-transformers")
  try:
    with safe_open(str(weights), framework="numpy") as f:
      kernel = np.asarray(f.get_tensor("linear.weight"), np.float32).T.copy()  # [out, in] -> [in, out]
      bias = np.asarray(f.get_tensor("linear.bias"), np.float32) if cfg.get("bias", True) else None
  except Exception as e:  # pylint: disable=broad-except
    raise PretrainedError(f"cannot read the Dense weights {weights} ({e})") from e
  if kernel.shape != (int(cfg["in_features"]), int(cfg["out_features"])):
    raise PretrainedError(f"{weights}: linear.weight has shape {kernel.T.shape}, its config says "
                          f"[{cfg['out_features']}, {cfg['in_features']}]")
  return Dense(kernel, bias)


def read(path: str | os.PathLike[str]) -> Pipeline:
  """The checkpoint's pipeline from its sentence-transformers files; a plain Hugging Face BERT directory (no
  modules.json) gives big_embed's defaults (mean pooling, normalised), marked `source="default"`.

  Raises:
    PretrainedError: a file cannot be read, or a module or setting big_embed does not reproduce exactly.
  """
  path = pathlib.Path(path)
  modules_file = path / MODULES_FILE
  fields: dict[str, Any] = {}
  sources = []
  if modules_file.is_file():
    modules = _json(modules_file)
    types = [str(m.get("type", "")).removeprefix(_TYPE) for m in modules]
    if not types or types[0] != "Transformer" or modules[0].get("path", "") != "":
      raise PretrainedError(f"{modules_file}: the first module must be the Transformer at path \"\"; got {types}")
    fields["normalize"] = False
    fields["pooling"] = None
    for module, kind in zip(modules[1:], types[1:]):
      directory = path / module.get("path", "")
      if kind == "Pooling" and fields["pooling"] is None and not fields.get("dense"):
        fields["pooling"] = _pooling(directory)
      elif kind == "Dense" and fields["pooling"] and "dense" not in fields and not fields["normalize"]:
        fields["dense"] = _dense(directory)
      elif kind == "Normalize" and fields["pooling"] and not fields["normalize"]:
        fields["normalize"] = True
      else:
        raise PretrainedError(f"{modules_file}: modules {types} are not supported; big_embed reproduces "
                              "Transformer -> Pooling -> at most one Dense -> optional Normalize")
    if fields["pooling"] is None:
      raise PretrainedError(f"{modules_file} has no Pooling module")
    sources.append(MODULES_FILE)
  bert_config = path / BERT_CONFIG_FILE
  if bert_config.is_file():
    cfg = _json(bert_config)
    if cfg.get("do_lower_case"):
      raise PretrainedError(f"{bert_config}: do_lower_case=true is not supported; lower-case in the tokenizer's "
                            "normalizer instead")
    fields["max_seq_length"] = int(cfg["max_seq_length"]) if cfg.get("max_seq_length") else None
    sources.append(BERT_CONFIG_FILE)
  st_config = path / ST_CONFIG_FILE
  if st_config.is_file():
    cfg = _json(st_config)
    prompts = cfg.get("prompts") or {}
    unknown = sorted(set(prompts) - {"query", "document", "passage"})
    if any(prompts.get(k) for k in unknown):
      raise PretrainedError(f"{st_config}: prompts {unknown} are not supported; big_embed has a query and a "
                            "document prompt")
    fields["query_prompt"] = prompts.get("query", "") or ""
    fields["doc_prompt"] = prompts.get("document", "") or prompts.get("passage", "") or ""
    if cfg.get("similarity_fn_name") not in (None, "cosine"):
      raise PretrainedError(f"{st_config}: similarity_fn_name={cfg['similarity_fn_name']!r}; big_embed scores "
                            "with cosine similarity")
    sources.append(ST_CONFIG_FILE)
  return Pipeline(**fields, source=", ".join(sources) or "default: the checkpoint has no sentence-transformers files")


def write(path: str | os.PathLike[str], pipeline: Pipeline, hidden_size: int) -> None:
  """Writes the sentence-transformers files of `pipeline` into `path` (next to the Hugging Face files)."""
  path = pathlib.Path(path)
  modules = [{"idx": 0, "name": "0", "path": "", "type": _TYPE + "Transformer"}]

  def add(kind: str) -> pathlib.Path:
    idx = len(modules)
    modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_{kind}", "type": _TYPE + kind})
    directory = path / f"{idx}_{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory

  pooling = {flag: pipeline.pooling == mode for flag, mode in _POOLING_FLAGS.items()}
  pooling.update({flag: False for flag in _OTHER_POOLING_FLAGS})
  _write_json(add("Pooling") / "config.json", {"word_embedding_dimension": hidden_size, **pooling,
                                               "include_prompt": True})
  if pipeline.dense is not None:
    directory = add("Dense")
    kernel = np.asarray(pipeline.dense.kernel, np.float32)
    _write_json(directory / "config.json", {"in_features": int(kernel.shape[0]), "out_features": int(kernel.shape[1]),
                                            "bias": pipeline.dense.bias is not None,
                                            "activation_function": _IDENTITY[0]})
    tensors = {"linear.weight": np.ascontiguousarray(kernel.T)}  # [out, in], torch's layout
    if pipeline.dense.bias is not None:
      tensors["linear.bias"] = np.asarray(pipeline.dense.bias, np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
  if pipeline.normalize:
    add("Normalize")
  _write_json(path / MODULES_FILE, modules)
  _write_json(path / BERT_CONFIG_FILE, {"max_seq_length": pipeline.max_seq_length, "do_lower_case": False})
  prompts = {"query": pipeline.query_prompt, "document": pipeline.doc_prompt}
  _write_json(path / ST_CONFIG_FILE, {"prompts": prompts, "default_prompt_name": "document" if pipeline.doc_prompt
                                      else None, "similarity_fn_name": "cosine"})


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
