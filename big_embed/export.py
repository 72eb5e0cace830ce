r"""Export a trained text model as a Hugging Face BERT directory that sentence-transformers loads as it is.

    python -m big_embed.export --workdir runs/text_retrieval --output exported/ [--step N] [--overwrite]

    from sentence_transformers import SentenceTransformer      # elsewhere, with PyTorch
    model = SentenceTransformer("exported/")                    # the same embeddings as big_embed.encode

The directory holds the Hugging Face part (`config.json` of a `BertModel`, `model.safetensors` in its tensor names
and layouts, the run's `tokenizer.json` with `tokenizer_config.json` / `special_tokens_map.json`) and the
sentence-transformers part (`modules.json`: Transformer -> Pooling -> Dense (the projection or scaling layer, if
the model has one) -> Normalize, `sentence_bert_config.json` with the run's max_text_len as max_seq_length, and
`config_sentence_transformers.json` with the query / document prefixes as prompts), written by
`models.st_modules`; `big_embed.encode.load(DIR)` reads it back (the suite checks that round trip to 1e-5).

What is exported: a text model (`config.model.type="text"`), or the text side of a two-tower model whose text
tower is a BERT (`text_pretrained`); its projection (and the BERT side's own Dense, composed with it: both are
linear) becomes the Dense module. A two-tower model with big_embed's own pre-LayerNorm text Transformer has no
BERT equivalent and is refused with that reason. The directory is written next to --output and renamed into place,
so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from big_embed import models
from big_embed import run as run_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError, exit_on_user_error
from big_embed.models import bert as bert_lib
from big_embed.models import layers
from big_embed.models import st_modules
from big_embed.models import text_embedder
from big_embed.models import two_tower
from big_embed.parallel import mesh as mesh_lib

# What every directory `export_text_model` writes holds: only such a directory is replaced by --overwrite.
EXPORT_MARKERS = ("config.json", "model.safetensors", "tokenizer.json", st_modules.MODULES_FILE,
                  st_modules.BERT_CONFIG_FILE)
_SPECIAL_TOKENS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                   "mask_token": "[MASK]"}


def bert_tensors(bert: dict[str, Any]) -> dict[str, np.ndarray]:
  """`BertEncoder` params (either layer layout) -> float32 tensors in Hugging Face `BertModel` names and layouts
  (the inverse of `models.pretrained.load_bert_params`: kernels [in, out] become weights [out, in], the per-head
  attention kernels are merged back)."""
  p = layers.to_layout(jax.tree.map(lambda x: np.asarray(x, np.float32), bert), scan_layers=False)
  out: dict[str, np.ndarray] = {}

  def put(name: str, value) -> None:
    out[name] = np.ascontiguousarray(value, dtype=np.float32)

  def layer_norm(name: str, q: dict) -> None:
    put(name + ".weight", q["scale"])
    put(name + ".bias", q["bias"])

  def linear(name: str, q: dict) -> None:  # kernel [in, out] -> weight [out, in]
    put(name + ".weight", q["kernel"].T)
    put(name + ".bias", q["bias"])

  put("embeddings.word_embeddings.weight", p["word_embeddings"]["embedding"])
  put("embeddings.position_embeddings.weight", p["position_embeddings"])
  put("embeddings.token_type_embeddings.weight", p["token_type_embeddings"])
  layer_norm("embeddings.LayerNorm", p["embeddings_ln"])
  for i in range(sum(k.startswith("layer_") for k in p)):
    lp, prefix = p[f"layer_{i}"], f"encoder.layer.{i}."
    attention = lp["attention"]
    hidden = attention["query"]["kernel"].shape[0]
    for name in ("query", "key", "value"):
      q = attention[name]  # kernel [H, heads, H / heads], bias [heads, H / heads]
      put(prefix + f"attention.self.{name}.weight", q["kernel"].reshape(hidden, hidden).T)
      put(prefix + f"attention.self.{name}.bias", q["bias"].reshape(hidden))
    o = attention["out"]  # kernel [heads, H / heads, H]
    put(prefix + "attention.output.dense.weight", o["kernel"].reshape(hidden, hidden).T)
    put(prefix + "attention.output.dense.bias", o["bias"])
    layer_norm(prefix + "attention.output.LayerNorm", lp["attention_ln"])
    linear(prefix + "intermediate.dense", lp["intermediate"])
    linear(prefix + "output.dense", lp["output"])
    layer_norm(prefix + "output.LayerNorm", lp["output_ln"])
  return out


def _bert_config(kw: dict[str, Any], dropout: float) -> dict[str, Any]:
  return {
      "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
      "position_embedding_type": "absolute", "pad_token_id": 0, "initializer_range": 0.02,
      "vocab_size": kw["vocab_size"], "hidden_size": kw["hidden_size"], "num_hidden_layers": kw["num_layers"],
      "num_attention_heads": kw["num_heads"], "intermediate_size": kw["intermediate_size"],
      "max_position_embeddings": kw["max_position_embeddings"],
      "type_vocab_size": kw.get("type_vocab_size", bert_lib.BertEncoder.type_vocab_size),
      "layer_norm_eps": kw.get("layer_norm_eps", bert_lib.BertEncoder.layer_norm_eps),
      "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
  }


def _dense_of(text_params: dict[str, Any]) -> st_modules.Dense | None:
  """The text model's projection (no bias) or scaling layer (with bias) as one Dense, if it has one."""
  if "scaling" in text_params:
    return st_modules.Dense(np.asarray(text_params["scaling"]["kernel"], np.float32),
                            np.asarray(text_params["scaling"]["bias"], np.float32))
  if "projection" in text_params:
    return st_modules.Dense(np.asarray(text_params["projection"]["kernel"], np.float32), None)
  return None


def _then(first: st_modules.Dense | None, kernel: np.ndarray) -> st_modules.Dense:
  """`first` followed by the bias-free linear map `kernel`, as one Dense (x K1 + b1) K2 = x (K1 K2) + b1 K2."""
  kernel = np.asarray(kernel, np.float32)
  if first is None:
    return st_modules.Dense(kernel, None)
  bias = None if first.bias is None else first.bias @ kernel
  return st_modules.Dense(first.kernel @ kernel, bias)


def text_side(model_config: ml_collections.ConfigDict, params: dict[str, Any]
              ) -> tuple[ml_collections.ConfigDict, dict[str, Any], st_modules.Dense | None]:
  """(the BERT tower's text model config, its `bert` params, the Dense after its pooling) of a run's model.

  Raises:
    ConfigError: the model's text side is not a BERT (a two-tower model's own Transformer).
  """
  if models.kind_of(model_config).name == "text":
    text_config = models.resolve(model_config)
    return text_config, params["bert"], _dense_of(params)
  if not model_config.get("text_pretrained", ""):
    raise ConfigError("this two-tower run's text side is big_embed's pre-LayerNorm Transformer, which has no Hugging "
                      "Face BERT equivalent; export takes a text model (config.model.type='text') or a two-tower "
                      "model whose text side is a BERT (config.model.text_pretrained)")
  text_config = two_tower.pretrained_text_config(model_config)
  tower = params["text_tower"]
  return text_config, tower["bert"], _then(_dense_of(tower), params["text_proj"]["kernel"])


def _tokenizer_files(tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
  """tokenizer_config.json and special_tokens_map.json for the run's tokenizer (only the tokens it has)."""
  vocab = json.loads(tokenizer.to_str())["model"].get("vocab", {})
  special = {k: v for k, v in _SPECIAL_TOKENS.items() if v in vocab}
  return {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                                    "clean_up_tokenization_spaces": False, **special},
          "special_tokens_map.json": special}


def _check_output(out: pathlib.Path, overwrite: bool) -> None:
  """Refuses an `out` that exists and is not empty, unless `overwrite` and it is a previous export (a directory, not
  a symbolic link, holding every one of `EXPORT_MARKERS`): --overwrite never deletes anything else."""
  if not out.name:
    raise ConfigError(f"--output {out} is a filesystem root; give a directory to create (e.g. exported/)")
  if not (out.exists() or out.is_symlink()) or (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
    return
  if not overwrite:
    raise ConfigError(f"--output {out} exists and is not empty; choose a new directory or pass --overwrite")
  missing = [] if out.is_dir() else list(EXPORT_MARKERS)
  missing = missing or [m for m in EXPORT_MARKERS if not (out / m).is_file()]
  if out.is_symlink() or missing:
    why = "a symbolic link" if out.is_symlink() else f"not a previous export (it lacks {', '.join(missing)})"
    raise ConfigError(f"--output {out} is {why}; --overwrite replaces only a directory this exporter wrote: choose "
                      "a new directory")


def export_text_model(model_config: ml_collections.ConfigDict, params: dict[str, Any], tokenizer: Tokenizer,
                      output: str | os.PathLike[str], *, overwrite: bool = False, note: str = "") -> pathlib.Path:
  """Writes the text model (`config.model`, its params as host arrays or jax.Arrays) into `output`.

  Returns:
    The output directory.

  Raises:
    ConfigError: the model cannot be exported (see `text_side`); `output` exists and is not empty, and is not a
      previous export or `overwrite` is off (`_check_output`).
  """
  out = pathlib.Path(os.path.normpath(pathlib.Path(output).expanduser().absolute()))  # ".." resolved, links kept
  _check_output(out, overwrite)
  params = jax.device_get(params)
  text_config, bert, dense = text_side(model_config, params)
  kw = text_embedder.bert_config(text_config, tokenizer.vocab_size)
  max_len = int(text_config.max_text_len)
  pipeline = st_modules.Pipeline(pooling=text_config.pooling, dense=dense, normalize=True, max_seq_length=max_len,
                                 query_prompt=text_config.get("query_prefix", ""),
                                 doc_prompt=text_config.get("doc_prefix", ""))
  tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    (tmp / "config.json").write_text(json.dumps(_bert_config(kw, float(text_config.get("dropout", 0.0))), indent=2)
                                     + "\n", encoding="utf-8")
    save_file(bert_tensors(bert), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(tmp / "tokenizer.json")
    for name, value in _tokenizer_files(tokenizer, max_len).items():
      (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    st_modules.write(tmp, pipeline, kw["hidden_size"])
    (tmp / "README.md").write_text(
        f"# big_embed export\n\n{note}\n\nLoad with `SentenceTransformer(<this directory>)` or "
        f"`big_embed.encode.load(<this directory>)`.\n\n{pipeline.describe('this model')}\n", encoding="utf-8")
    if out.exists():
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def export_run(workdir: str | os.PathLike[str], output: str | os.PathLike[str], step: int | None = None, *,
               overwrite: bool = False) -> pathlib.Path:
  """Exports the newest (or `step`) checkpoint of the run in `workdir` (see `export_text_model`)."""
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  run = run_lib.restore_run(workdir, mesh, step)
  note = f"Exported from the big_embed run `{run.workdir.name}` at step {run.step}."
  return export_text_model(run.config.model, run.params, run.tokenizer, output, overwrite=overwrite, note=note)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  logging.set_verbosity(logging.ERROR)
  with exit_on_user_error():
    if not run_lib.is_run(f.workdir):
      raise ConfigError(f"--workdir {f.workdir} is not a run (no checkpoints/ in it); train one with python -m "
                        "big_embed.main --config ... --workdir ...")
    out = export_run(f.workdir, f.output, f.step, overwrite=f.overwrite)
    print(f"Exported {f.workdir} -> {out} (load it with SentenceTransformer({str(out)!r}))", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
  flags.DEFINE_string("output", None, "The directory to write (new or empty).", required=True)
  flags.DEFINE_integer("step", None, "The checkpoint step (default: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace --output if it is a previous export (nothing else).")
  app.run(main)
