r"""Embed texts (and images) with a trained run or a pretrained model: the interface MTEB-style tools call.

    from big_embed import encode
    model = encode.load("runs/text_retrieval")     # a workdir: its saved config and newest checkpoint
    model = encode.load("minilm")                  # or a pretrained model ("minilm", a HF / sentence-transformers dir)
    emb = model.encode(["A man is playing a guitar.", ...], batch_size=64)   # float32 [N, D]
    q = model.encode_queries(queries)              # with the model's query prefix, if it has one
    d = model.encode_corpus(docs)                  # with its document prefix
    img = model.encode_images(images)              # a two-tower run: uint8 [N, H, W, 3] or PIL images -> [N, D]

    import mteb                                    # mteb 2.x takes the model as it is:
    mteb.evaluate(model, tasks=mteb.get_tasks(tasks=["STSBenchmark"]))

`encode` also takes what mteb 2.x hands an `EncoderProtocol`: an iterable of batch dicts (its DataLoader, batches
like {"text": [...]}; image batches {"image": [...]} for a two-tower run) with `task_metadata`, `hf_split`,
`hf_subset` and `prompt_type` ("query" -> the query prefix, "document" or none -> the document prefix). Anything
else (a batch without "text", a non-string text) is a `ConfigError`, never a wrong-shaped array. `similarity`,
`similarity_pairwise` (cosine) and `mteb_model_meta` complete the protocol; big_embed imports neither mteb nor
torch (the metadata is built only when mteb is importable).

Embeddings are unit vectors, except for a pretrained checkpoint without a sentence-transformers Normalize module,
whose embeddings are returned as that checkpoint gives them. Batches are sharded over every local device, texts are
grouped by length (each batch is cut to its longest text), and a progress bar shows long runs. From the shell:

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
import jax
import ml_collections
import numpy as np

from big_embed import models
from big_embed import run as run_lib
from big_embed.data import image_ops
from big_embed.data.tokenizer import Tokenizer
from big_embed.errors import ConfigError, exit_on_user_error
from big_embed.evaluate import encode as encode_lib
from big_embed.models import pretrained
from big_embed.models import text_embedder
from big_embed.parallel import mesh as mesh_lib


ROLES = ("query", "doc")
_PROMPT_ROLES = {"query": "query", "document": "doc", "passage": "doc"}  # mteb's PromptType values -> roles


def texts_of(inputs) -> list[str]:
  """The texts of `inputs`: a str, a sequence of str, or an iterable of batch dicts {"text": [str, ...]} (mteb's
  DataLoader), in order.

  Raises:
    ConfigError: anything else, naming what was found.
  """
  if isinstance(inputs, str):
    return [inputs]
  if isinstance(inputs, dict):
    inputs = [inputs]
  texts: list[str] = []
  for index, item in enumerate(inputs):
    if isinstance(item, str):
      texts.append(item)
      continue
    if not isinstance(item, dict) or "text" not in item:
      got = f"a dict with keys {sorted(item)}" if isinstance(item, dict) else f"a {type(item).__name__}"
      raise ConfigError(f"encode: input {index} is {got}; give texts (str), or batches of texts like "
                        "{'text': [str, ...]} as mteb's DataLoader yields them")
    batch = item["text"]
    batch = [batch] if isinstance(batch, str) else list(batch)
    bad = [type(t).__name__ for t in batch if not isinstance(t, str)]
    if bad:
      raise ConfigError(f"encode: batch {index}'s 'text' holds {bad[0]} values, not str; give one string per text")
    texts.extend(batch)
  return texts


def _role(role: str | None, prompt_type) -> str:
  """The prefix role of a call: `role` if given, else from mteb's `prompt_type` ("query" / "document"), else "doc"."""
  from_prompt = None
  if prompt_type is not None:
    value = str(getattr(prompt_type, "value", prompt_type))
    if value not in _PROMPT_ROLES:
      raise ConfigError(f"encode: prompt_type={value!r} is not one of {sorted(_PROMPT_ROLES)}")
    from_prompt = _PROMPT_ROLES[value]
  if role is not None and role not in ROLES:
    raise ConfigError(f"encode: role={role!r} is not one of {ROLES}")
  if role is not None and from_prompt is not None and role != from_prompt:
    raise ConfigError(f"encode: role={role!r} contradicts prompt_type={prompt_type!r}; give one of them")
  return role or from_prompt or "doc"


class Embedder:
  """A loaded model: `encode(texts) -> float32 [N, D]`, and `encode_images(images)` for a two-tower run."""

  def __init__(self, model, params, tokenizer: Tokenizer, model_config: ml_collections.ConfigDict, mesh,
               step: int | None = None, name: str = "", normalize: bool = True):
    self.model, self.params, self.tokenizer, self.mesh, self.step = model, params, tokenizer, mesh, step
    self.model_config, self.name, self.normalize = model_config, name, normalize
    self.max_len = int(model_config.max_text_len)
    self.query_prefix = model_config.get("query_prefix", "")
    self.doc_prefix = model_config.get("doc_prefix", "")
    self.image_size = int(model_config.get("image_size", 0)) if hasattr(model, "encode_image") else 0
    self._encoders: dict[int, encode_lib.Encoder] = {}
    self._encodings: dict[int, encode_lib.TextEncoding] = {}
    self._dim: int | None = None

  def _encoder(self, batch_size: int) -> encode_lib.Encoder:
    if batch_size <= 0:
      raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    if batch_size not in self._encoders:
      self._encoders[batch_size] = encode_lib.Encoder(self.model, self.mesh, batch_size,
                                                      text_method="encode_text" if self.normalize else "features")
    return self._encoders[batch_size]

  def _encoding(self, batch_size: int) -> encode_lib.TextEncoding:
    if batch_size not in self._encodings:
      self._encodings[batch_size] = encode_lib.TextEncoding(self._encoder(batch_size), self.tokenizer, self.max_len,
                                                            self.query_prefix, self.doc_prefix)
    return self._encodings[batch_size]

  def encode(self, inputs, *, task_metadata=None, hf_split: str | None = None, hf_subset: str | None = None,
             prompt_type=None, batch_size: int = 32, show_progress_bar: bool = True, role: str | None = None,
             **unused_kwargs) -> np.ndarray:
    """Embeds texts: one row per text, in order (a str gives one row).

    Args:
      inputs: a str, a sequence of str, or an iterable of batch dicts {"text": [...]} (mteb's DataLoader); for a
        two-tower run, batches {"image": [...]} go to `encode_images`.
      task_metadata, hf_split, hf_subset: what mteb passes; not used (the prefixes are the model's own).
      prompt_type: mteb's PromptType ("query" or "document"), picks the prefix when `role` is not given.
      batch_size: texts per device batch (rounded to the devices).
      role: "query" or "doc": which prefix to put before each text (default "doc").
      **unused_kwargs: other keyword arguments tools pass (e.g. `convert_to_numpy`) are accepted and ignored.

    Returns:
      float32 [N, D], unit rows (see the module docstring for checkpoints without normalisation).

    Raises:
      ConfigError: inputs that are not texts, an unknown role or prompt type, a batch_size <= 0.
    """
    del task_metadata, hf_split, hf_subset
    if not isinstance(inputs, (str, dict, list, tuple, np.ndarray)):
      inputs = list(inputs)  # a DataLoader or a generator: read once
    first = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else None
    if isinstance(first, dict) and "image" in first and "text" not in first:
      return self.encode_images([image for batch in inputs for image in batch["image"]], batch_size=batch_size,
                                show_progress_bar=show_progress_bar)
    texts = texts_of(inputs)
    role = _role(role, prompt_type)
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    desc = "encode" if show_progress_bar and len(texts) > batch_size else None
    return self._encoding(int(batch_size))(self.params, texts, role, desc=desc)

  def encode_queries(self, queries: Sequence[str], batch_size: int = 32, **kwargs) -> np.ndarray:
    return self.encode(queries, batch_size=batch_size, role="query", **kwargs)

  def encode_corpus(self, corpus, batch_size: int = 32, **kwargs) -> np.ndarray:
    """`corpus`: texts, or BEIR-style dicts {"title", "text"} (joined with a space)."""
    texts = [(f"{d.get('title', '')} {d.get('text', '')}".strip() if isinstance(d, dict) else d) for d in corpus]
    return self.encode(texts, batch_size=batch_size, role="doc", **kwargs)

  def encode_images(self, images, batch_size: int = 32, show_progress_bar: bool = True) -> np.ndarray:
    """Embeds images with a two-tower run's image tower: uint8 [N, H, W(, 3)] or a list of arrays / PIL images of any
    size (resized to the model's image size as training does) -> float32 [N, D] unit rows.

    Raises:
      ConfigError: the model has no image tower, or an image is not an image.
    """
    if not self.image_size:
      raise ConfigError(f"encode_images: {self.name or 'this model'} is a text model and has no image tower")
    arrays = []
    for index, image in enumerate(images):
      array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
      if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
        raise ConfigError(f"encode_images: image {index} is {array.dtype} {array.shape}; give uint8 [H, W, 3] (or "
                          "grayscale [H, W]) arrays or PIL images")
      arrays.append(image_ops.to_rgb(array, self.image_size))
    if not arrays:
      return np.zeros((0, self.dim), np.float32)
    desc = "encode images" if show_progress_bar and len(arrays) > batch_size else None
    return self._encoder(int(batch_size)).images(self.params, np.stack(arrays), desc=desc)

  def similarity(self, embeddings1, embeddings2) -> np.ndarray:
    """Cosine similarity of every pair: [N1, D], [N2, D] (or [D]) -> float32 [N1, N2]."""
    a, b = (_unit(np.atleast_2d(np.asarray(e, np.float32))) for e in (embeddings1, embeddings2))
    return a @ b.T

  def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
    """Cosine similarity of corresponding rows: [N, D], [N, D] -> float32 [N]."""
    a, b = (_unit(np.atleast_2d(np.asarray(e, np.float32))) for e in (embeddings1, embeddings2))
    return np.sum(a * b, axis=-1)

  @property
  def mteb_model_meta(self):
    """mteb's `ModelMeta` of this model when mteb is installed, else None (big_embed does not need mteb)."""
    try:
      from mteb.models.model_meta import ModelMeta, ScoringFunction  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(self.params)))
    return ModelMeta.create_empty(overwrites={
        "name": f"big_embed/{self.name or 'model'}", "revision": str(self.step if self.step is not None else "none"),
        "embed_dim": self.dim, "max_tokens": self.max_len, "n_parameters": n_params,
        "similarity_fn_name": ScoringFunction.COSINE, "modalities": ["text", "image"] if self.image_size else ["text"]})

  @property
  def dim(self) -> int:
    if self._dim is None:
      self._dim = int(self.encode(["dimension probe"], batch_size=1, show_progress_bar=False).shape[1])
    return self._dim


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _default_mesh():
  return mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def load_pretrained(name_or_path: str, mesh=None, **model_overrides) -> Embedder:
  """A pretrained HF-format BERT ("minilm" or a directory) with its own tokenizer, pooled, projected, normalised,
  cut at its `max_seq_length` and prompted as its sentence-transformers files say (`models.st_modules`; printed)."""
  mesh = mesh or _default_mesh()
  run = run_lib.restore_pretrained(name_or_path, mesh, **model_overrides)
  cfg = run.config.model
  return Embedder(run.model, run.params, run.tokenizer, cfg, mesh, name=pathlib.Path(os.fspath(name_or_path)).name,
                  normalize=text_embedder.checkpoint_pipeline(cfg).normalize)


def load_run(workdir: str | os.PathLike[str], step: int | None = None, mesh=None) -> Embedder:
  """The newest (or `step`) checkpoint of a training run, with the run's saved config and tokenizer."""
  mesh = mesh or _default_mesh()
  run = run_lib.restore_run(workdir, mesh, step)
  return Embedder(run.model, run.params, run.tokenizer, models.resolve(run.config.model), mesh, step=run.step,
                  name=run.workdir.name)


def load(model: str | os.PathLike[str], step: int | None = None, mesh=None) -> Embedder:
  """A run's workdir (a directory with `checkpoints/`), or else a pretrained model name or HF directory.

  Raises:
    ConfigError: `model` is neither (the message says what each must look like).
  """
  if run_lib.is_run(model):
    return load_run(model, step=step, mesh=mesh)
  try:
    pretrained.resolve_pretrained(os.fspath(model))
  except pretrained.PretrainedError as err:
    raise ConfigError(f"--model {os.fspath(model)!r} is neither a run's workdir (a directory with checkpoints/, "
                      f"written by python -m big_embed.main --workdir ...) nor a pretrained model: {err}") from err
  return load_pretrained(os.fspath(model), mesh=mesh)


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
