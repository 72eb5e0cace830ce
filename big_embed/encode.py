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
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from big_embed import checkpoint as ckpt_lib
from big_embed import models
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError
from big_embed.evaluate import encode as encode_lib
from big_embed.parallel import mesh as mesh_lib
from big_embed.train import state as state_lib


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
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
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
  """A pretrained HF-format BERT ("minilm" or a directory) as loaded, with its own tokenizer."""
  from big_embed.models import pretrained, text_embedder  # pylint: disable=g-import-not-at-top
  mesh = mesh or _default_mesh()
  cfg = text_embedder.default_text_model_config()
  cfg.pretrained = name_or_path
  for key, value in model_overrides.items():
    cfg[key] = value
  tokenizer = pretrained.load_tokenizer(pretrained.resolve_pretrained(name_or_path))
  model = models.build_model(cfg, tokenizer.vocab_size)
  init = jax.jit(lambda: model.init(jax.random.PRNGKey(0), models.example_batch(cfg))["params"])()
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = text_embedder.merge_pretrained(jax.device_get(nn.unbox(init)), text_embedder.pretrained_model_params(cfg))
  params = jax.device_put(params, mesh_lib.replicated(mesh))
  return TextEncoder(model, params, tokenizer, cfg, mesh)


def load_run(workdir: str | os.PathLike[str], step: int | None = None, mesh=None) -> TextEncoder:
  """The newest (or `step`) checkpoint of a training run, with the run's saved config and tokenizer."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise ConfigError(f"{workdir} holds no checkpoint; train a model there first (python -m big_embed.main "
                      f"--config ... --workdir {workdir}) or pass a pretrained model such as 'minilm'")
  tok_path = workdir / "tokenizer.json"
  if not tok_path.is_file():
    raise ConfigError(f"{tok_path} is missing; it is written when a run starts, so {workdir} is not a "
                      "complete big_embed run")
  config = ml_collections.ConfigDict(checkpointer.restore_meta(step)["config"])
  mesh = mesh or _default_mesh()
  tokenizer = Tokenizer.from_file(str(tok_path))
  model = models.build_model(config.model, tokenizer.vocab_size)
  abstract, shardings = state_lib.state_shardings(state_lib.init_fn_from_config(config, model), mesh)
  state, _ = checkpointer.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
  checkpointer.close()
  return TextEncoder(model, state.params["model"], tokenizer, config.model, mesh, step=step)


def load(model: str | os.PathLike[str], step: int | None = None, mesh=None) -> TextEncoder:
  """A run's workdir (a directory with `checkpoints/`), or else a pretrained model name or HF directory."""
  path = pathlib.Path(model).expanduser()
  if (path / "checkpoints").is_dir():
    return load_run(path, step=step, mesh=mesh)
  return load_pretrained(os.fspath(model), mesh=mesh)


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  from big_embed.data.errors import DataError  # pylint: disable=g-import-not-at-top
  from big_embed.errors import UserError  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  try:
    encoder = load(f.model)
    path = pathlib.Path(f.input)
    if not path.is_file():
      raise ConfigError(f"--input {path} does not exist")
    texts = path.read_text(encoding="utf-8").splitlines()
    emb = encoder.encode(texts, batch_size=f.batch_size, role=f.role)
    out = pathlib.Path(f.output)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, out)
    print(f"Embedded {len(texts)} texts -> {out} {emb.shape}", flush=True)
  except (UserError, DataError, ValueError, UnicodeDecodeError) as err:
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "minilm", "A run's workdir, 'minilm', or a HF-format BERT directory.")
  flags.DEFINE_string("input", None, "Text file, one text per line.", required=True)
  flags.DEFINE_string("output", None, "Output .npy file.", required=True)
  flags.DEFINE_integer("batch_size", 64, "Texts per batch.")
  flags.DEFINE_enum("role", "doc", ["doc", "query"], "Which prefix to apply.")
  app.run(main)
