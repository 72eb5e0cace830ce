r"""Embed texts with a trained run or a pretrained model: the interface MTEB-style tools call.

    from big_embed import encode
    model = encode.load("runs/text_retrieval")     # a workdir: its saved config and newest checkpoint
    model = encode.load("minilm")                  # or a pretrained model as loaded ("minilm" or a HF directory)
    emb = model.encode(["A man is playing a guitar.", ...], batch_size=64)   # float32 [N, D], unit norm
    q = model.encode_queries(queries)              # with the model's query prefix, if it has one
    d = model.encode_corpus(docs)                  # with its document prefix

Batches are sharded over every local device, texts are grouped by length (each batch is cut to its longest
text), and a progress bar shows long runs. From the shell:

    python -m big_embed.encode --model runs/text_retrieval --input texts.txt --output emb.npy [--role query]

(one text per line of --input; --output is a .npy file of shape [lines, D]).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from big_embed import config_schema
from big_embed import models
from big_embed import run as run_lib
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError, exit_on_user_error
from big_embed.evaluate import encode as encode_lib
from big_embed.models import pretrained
from big_embed.parallel import mesh as mesh_lib


class TextEncoder:
  """A loaded text model: `encode(sentences, batch_size=32) -> float32 [N, D]` (L2-normalised)."""

  def __init__(self, model, params, tokenizer: Tokenizer, model_config: ml_collections.ConfigDict, mesh,
               step: int | None = None):
    self.model, self.params, self.tokenizer, self.mesh, self.step = model, params, tokenizer, mesh, step
    self.max_len = int(model_config.max_text_len)
    self.query_prefix = model_config.get("query_prefix", "")
    self.doc_prefix = model_config.get("doc_prefix", "")
    self._encodings: dict[int, encode_lib.TextEncoding] = {}

  def _encoding(self, batch_size: int) -> encode_lib.TextEncoding:
    if batch_size not in self._encodings:
      encoder = encode_lib.Encoder(self.model, self.mesh, batch_size)
      self._encodings[batch_size] = encode_lib.TextEncoding(encoder, self.tokenizer, self.max_len,
                                                            self.query_prefix, self.doc_prefix)
    return self._encodings[batch_size]

  def encode(self, sentences: str | Sequence[str], batch_size: int = 32, show_progress_bar: bool = True,
             role: str = "doc", **unused_kwargs) -> np.ndarray:
    """Embeds `sentences` (a str gives one row); `role` "query" or "doc" picks the prefix. Other keyword
    arguments that MTEB passes (e.g. `convert_to_numpy`) are accepted and ignored: the result is always a
    float32 NumPy array [N, D] of unit vectors."""
    if isinstance(sentences, str):
      sentences = [sentences]
    sentences = [str(s) for s in sentences]
    if not sentences:
      return np.zeros((0, self.dim), np.float32)
    if batch_size <= 0:
      raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    desc = "encode" if show_progress_bar and len(sentences) > batch_size else None
    return self._encoding(int(batch_size))(self.params, sentences, role, desc=desc)

  def encode_queries(self, queries: Sequence[str], batch_size: int = 32, **kwargs) -> np.ndarray:
    return self.encode(queries, batch_size=batch_size, role="query", **kwargs)

  def encode_corpus(self, corpus, batch_size: int = 32, **kwargs) -> np.ndarray:
    """`corpus`: texts, or BEIR-style dicts {"title", "text"} (joined with a space)."""
    texts = [(f"{d.get('title', '')} {d.get('text', '')}".strip() if isinstance(d, dict) else d) for d in corpus]
    return self.encode(texts, batch_size=batch_size, role="doc", **kwargs)

  @property
  def dim(self) -> int:
    return int(self.encode(["dimension probe"], batch_size=1, show_progress_bar=False).shape[1])


def _default_mesh():
  return mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_pretrained(name_or_path: str, mesh=None, **model_overrides) -> TextEncoder:
  """A pretrained HF-format BERT ("minilm" or a directory) as loaded, with its own tokenizer; texts are cut at the
  checkpoint's sentence-transformers `max_seq_length` when it has one (256 for MiniLM), else at 128 tokens."""
  mesh = mesh or _default_mesh()
  path = pretrained.resolve_pretrained(name_or_path)
  cfg = config_schema.model_defaults("text")
  cfg.pretrained = name_or_path
  cfg.max_text_len = pretrained.max_seq_length(path) or cfg.max_text_len
  cfg.update(model_overrides)
  kind = models.kind_of(cfg)
  tokenizer = pretrained.load_tokenizer(path)
  model = kind.build(cfg, tokenizer.vocab_size)
  init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), kind.example_batch(cfg))["params"])()
  params = pretrained.merge_pretrained(jax.device_get(nn.unbox(init)), kind.pretrained_params(cfg))
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  return TextEncoder(model, params, tokenizer, cfg, mesh)


def load_run(workdir: str | os.PathLike[str], step: int | None = None, mesh=None) -> TextEncoder:
  """The newest (or `step`) checkpoint of a training run, with the run's saved config and tokenizer."""
  mesh = mesh or _default_mesh()
  run = run_lib.restore_run(workdir, mesh, step)
  return TextEncoder(run.model, run.params, run.tokenizer, run.config.model, mesh, step=run.step)


def load(model: str | os.PathLike[str], step: int | None = None, mesh=None) -> TextEncoder:
  """A run's workdir (a directory with `checkpoints/`), or else a pretrained model name or HF directory.

  Raises:
    ConfigError: `model` is neither (the message says what each must look like).
  """
  if run_lib.is_run(model):
    return load_run(model, step=step, mesh=mesh)
  try:
    return load_pretrained(os.fspath(model), mesh=mesh)
  except pretrained.PretrainedError as err:
    raise ConfigError(f"--model {os.fspath(model)!r} is neither a run's workdir (a directory with checkpoints/, "
                      f"written by python -m big_embed.main --workdir ...) nor a pretrained model: {err}") from err


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  logging.set_verbosity(logging.ERROR)
  with exit_on_user_error():
    path = pathlib.Path(f.input)
    if not path.is_file():
      raise ConfigError(f"--input {path} does not exist")
    try:  # lines end at a newline only (str.splitlines would also break at \f, U+2028, ...)
      texts = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
      raise ConfigError(f"--input {path} is not UTF-8 text ({err}); give one text per line") from err
    if not texts[-1]:  # the final newline ends the last line
      texts.pop()
    encoder = load(f.model)
    emb = encoder.encode(texts, batch_size=f.batch_size, role=f.role)
    out = pathlib.Path(f.output)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, out)
    print(f"Embedded {len(texts)} texts -> {out} {emb.shape}", flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("model", "minilm", "A run's workdir, 'minilm', or a HF-format BERT directory.")
  flags.DEFINE_string("input", None, "Text file, one text per line.", required=True)
  flags.DEFINE_string("output", None, "Output .npy file.", required=True)
  flags.DEFINE_integer("batch_size", 64, "Texts per batch.")
  flags.DEFINE_enum("role", "doc", ["doc", "query"], "Which prefix to apply.")
  app.run(main)
