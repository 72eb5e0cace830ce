"""Text tokenizers with fixed-length int32 batch encoding: the project's own small WordPiece, or a pretrained one.

Id 0 is always `[PAD]`; the text towers attend to / pool over the non-pad positions (`tokens != 0`).
The project's own tokenizer (`train_tokenizer`; `[UNK]` = id 1) has no post-processor, so no special tokens are
added around a text. A pretrained tokenizer.json (e.g. BERT's) keeps its post-processor: texts are encoded as
`[CLS] ... [SEP]`, truncated like Hugging Face does (the special tokens are kept, the text is cut).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from big_embed.data import paths
from big_embed.data.errors import DataError, prepare_command

PAD, UNK = "[PAD]", "[UNK]"
DEFAULT_VOCAB_SIZE = 4096


class Tokenizer:
  """Wraps a `tokenizers.Tokenizer` whose `[PAD]` is id 0."""

  pad_id = 0

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    if tokenizer.token_to_id(PAD) != self.pad_id or tokenizer.token_to_id(UNK) is None:
      raise ValueError(f"Tokenizer needs {PAD} at id 0 and an {UNK} token")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._tok = tokenizer
    self.unk_id: int = tokenizer.token_to_id(UNK)
    # Special tokens the post-processor adds to one text (0 without a post-processor, e.g. `train_tokenizer`'s).
    self._num_special: int = tokenizer.num_special_tokens_to_add(is_pair=False)

  @classmethod
  def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
    return cls(tokenizers.Tokenizer.from_file(os.fspath(path)))

  @classmethod
  def from_str(cls, s: str) -> Tokenizer:
    """Inverse of `to_str` (e.g. to restore the tokenizer stored with a checkpoint)."""
    return cls(tokenizers.Tokenizer.from_str(s))

  def to_str(self) -> str:
    """The tokenizer as a JSON string (the content of tokenizer.json)."""
    return self._tok.to_str()

  def save(self, path: str | os.PathLike[str]) -> None:
    self._tok.save(os.fspath(path))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode_batch(self, texts: list[str], max_len: int) -> np.ndarray:
    """Encodes texts as int32 [n, max_len]: special tokens added, truncated, right-padded with 0.

    Truncation cuts the text's own tokens on the right so that the tokenizer's special tokens (e.g. BERT's
    [CLS] and [SEP]) always fit, exactly as `tokenizers` truncation at `max_len` does. Every non-empty text
    gives at least one non-pad token (`[UNK]` if nothing else).
    """
    budget = max_len - self._num_special
    if budget < 0 or max_len < 1:
      raise ValueError(f"max_len={max_len} is too short: the tokenizer adds {self._num_special} special tokens "
                       "to every text; use a larger maximum text length")
    out = np.zeros((len(texts), max_len), np.int32)  # [n, max_len]
    encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
    for row, (text, enc) in enumerate(zip(texts, encodings)):
      if self._num_special:
        if len(enc.ids) > budget:
          enc.truncate(budget)
        ids = self._tok.post_process(enc, add_special_tokens=True).ids
      else:
        ids = enc.ids[:max_len]
      if not ids and text:
        ids = [self.unk_id]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes one row of ids (pads skipped) back to (normalised) text."""
    return self._tok.decode([int(i) for i in ids if i != self.pad_id])

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
  """Trains a lower-casing WordPiece tokenizer on `texts` (vocabulary at most `vocab_size`)."""
  tok = tokenizers.Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=64))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK],
                                      min_frequency=1, show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return Tokenizer(tok)


def save_atomically(tok: Tokenizer, path: pathlib.Path) -> pathlib.Path:
  """Writes `tok` to `path` (readers never see a partial file); returns `path`."""
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tok.save(tmp)
  os.replace(tmp, path)
  return path


def dataset_tokenizer_path(data_dir: str | os.PathLike[str] | None, name: str,
                           what: str = "config.model.tokenizer") -> pathlib.Path:
  """`<data_dir>/<name>/tokenizer.json`: the tokenizer `prepare files` trains for text dataset `name`.

  Raises:
    ConfigError: `name` is not a plain directory name (`paths.check_name`; `what` is how the user gave it).
  """
  return paths.resolve_data_dir(data_dir) / paths.check_name(name, what) / paths.TOKENIZER_FILENAME


def load_tokenizer(data_dir: str | os.PathLike[str] | None) -> Tokenizer:
  """Loads `<data_dir>/tokenizer.json` (written by `prepare`).

  Raises:
    DataError: the file is missing or unreadable; the message is the `prepare` command.
  """
  path = paths.tokenizer_path(data_dir)
  resolved = paths.resolve_data_dir(data_dir)
  if not path.is_file():
    raise DataError(f"No tokenizer at {path}. Build the datasets and tokenizer with: {_image_prepare(resolved)}")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f"Corrupt tokenizer {path} ({e}). Retrain it with: {_image_prepare(resolved)}") from e


def _image_prepare(data_dir: os.PathLike[str]) -> str:
  """The command that prepares the image corpora, whose captions train the tokenizer."""
  from big_embed.data import corpora  # pylint: disable=g-import-not-at-top  (TFDS: only when it is needed)
  return prepare_command(data_dir, corpora.names("image"))
