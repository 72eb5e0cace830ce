"""The corpus registry: one entry per dataset, holding everything the rest of the code knows about it.

Each corpus module of this package registers its corpus when imported (`register(Corpus(...))`); importing the
package imports every module (see `__init__.py`), so a new corpus is one new module. An entry gives:

  name            the CLI name (`python -m big_embed.data.prepare NAME`, `config.data.tasks.*.dataset`, evaluators)
  builder         the TFDS builder class (its `name` and `VERSION` fix where the prepared data lives)
  kind            "image" or "text"
  fields          record field -> kind (FIELD_KINDS), exactly the builder's features
  splits          the splits the builder writes
  debian_packages the Debian packages its raw sources come from (`prepare` installs them when root)
  retrieval, probe, multilabel, sts
                  the defaults of the text evaluators that can read it (None: that evaluator cannot):
                  (query field, doc field), (text field, ClassLabel field), (text field, Sequence(ClassLabel)
                  field), (text_a field, text_b field, score field)
  negatives       the Text or Sequence(Text) field of each record's own hard negatives for its retrieval pair
                  (None: none; a retrieval task with num_negatives > 0 then needs a mined set)
  image_text      for an image corpus: how the image-text training stream and its evaluators read it (`ImageText`)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from big_embed.errors import ConfigError

KINDS = ("image", "text")
# Record field kinds: Text, Sequence(Text), ClassLabel, Sequence(ClassLabel), a float/int scalar, an image (Image,
# or a uint8 Tensor of rank 2 or 3), anything else.
FIELD_KINDS = ("text", "text_seq", "class", "class_seq", "float", "image", "other")
TEXT_KINDS = ("text", "text_seq")  # fields read as text (a sequence joined with ", ")


def field_kind(feature: Any) -> str:
  """The FIELD_KINDS entry of a TFDS feature."""
  if isinstance(feature, tfds.features.ClassLabel):
    return "class"
  if isinstance(feature, tfds.features.Text):
    return "text"
  if isinstance(feature, tfds.features.Image):
    return "image"
  if isinstance(feature, tfds.features.Sequence):
    return {"text": "text_seq", "class": "class_seq"}.get(field_kind(feature.feature), "other")
  if isinstance(feature, tfds.features.Tensor):
    dtype = np.dtype(feature.np_dtype)
    if not feature.shape and dtype.kind in "fiu":
      return "float"
    if dtype == np.uint8 and len(feature.shape) in (2, 3):
      return "image"
  return "other"


@dataclasses.dataclass(frozen=True)
class ImageText:
  """How an image corpus feeds image-text training (captioned images) and the image evaluators.

  example: record -> {"ids": int, ...what `caption` reads}; examples with equal ids show the same thing (positives
    of each other). The image itself is read by the pipeline from `image_field`.
  caption: (example, numpy Generator) -> one random training caption.
  caption_texts: read_split -> every caption text training can produce, to train the tokenizer on;
    read_split(split) gives the corpus's prepared records of a split.
  label_field, class_names, prompt_templates: zero-shot classification (class i is named class_names[i] in
    prompts such as "a photo of a {}."); empty: the corpus has no zero-shot set.
  caption_field, id_field: image <-> text retrieval pairs (one caption per image); empty: no retrieval set.
  """
  example: Callable[[dict[str, Any]], dict[str, Any]]
  caption: Callable[[dict[str, Any], np.random.Generator], str]
  caption_texts: Callable[[Callable[[str], Sequence[dict[str, Any]]]], Iterable[str]]
  image_field: str = "image"
  label_field: str = ""
  class_names: tuple[str, ...] = ()
  prompt_templates: tuple[str, ...] = ()
  caption_field: str = ""
  id_field: str = ""


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One registered dataset (see the module docstring for the fields)."""
  name: str
  builder: type[tfds.core.GeneratorBasedBuilder]
  kind: str
  fields: Mapping[str, str]
  splits: tuple[str, ...] = ("train", "test")
  debian_packages: tuple[str, ...] = ()
  retrieval: tuple[str, str] | None = None
  probe: tuple[str, str] | None = None
  multilabel: tuple[str, str] | None = None
  sts: tuple[str, str, str] | None = None
  negatives: str | None = None
  image_text: ImageText | None = None

  def __post_init__(self):
    where = f"corpus {self.name!r}"
    if not self.name.isidentifier():
      raise ValueError(f"{where}: the name must be an identifier (it is a CLI and config name)")
    if self.kind not in KINDS:
      raise ValueError(f"{where}: kind {self.kind!r} is not one of {KINDS}")
    bad = {f: k for f, k in self.fields.items() if k not in FIELD_KINDS}
    if bad or not self.fields:
      raise ValueError(f"{where}: fields must map record fields to one of {FIELD_KINDS}, got {dict(self.fields)}")
    if not self.splits:
      raise ValueError(f"{where}: no splits")
    wanted = {"retrieval": (TEXT_KINDS, TEXT_KINDS), "probe": (TEXT_KINDS, ("class",)),
              "multilabel": (TEXT_KINDS, ("class_seq",)), "sts": (TEXT_KINDS, TEXT_KINDS, ("float",))}
    for evaluator, kinds in wanted.items():
      for field, allowed in zip(getattr(self, evaluator) or (), kinds):
        if self.fields.get(field) not in allowed:
          raise ValueError(f"{where}: {evaluator} field {field!r} must be one of its fields of kind {allowed}")
    if self.negatives is not None and (self.retrieval is None or self.fields.get(self.negatives) not in TEXT_KINDS):
      raise ValueError(f"{where}: negatives field {self.negatives!r} must be one of its fields of kind {TEXT_KINDS}, "
                       "next to a retrieval default")
    if (self.kind == "image") != (self.image_text is not None):
      raise ValueError(f"{where}: an image corpus needs image_text, a text corpus has none")

  def fields_of(self, *kinds: str) -> tuple[str, ...]:
    """The record fields of the given kinds, in declaration order."""
    return tuple(f for f, k in self.fields.items() if k in kinds)


_CORPORA: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
  """Adds `corpus` to the registry (a corpus module calls this once, at import).

  Raises:
    ValueError: another corpus has the same name or the same TFDS builder name.
  """
  for other in _CORPORA.values():
    if other is not corpus and (other.name == corpus.name or other.builder.name == corpus.builder.name):
      raise ValueError(f"corpus {corpus.name!r} (builder {corpus.builder.name!r}) clashes with the registered "
                       f"corpus {other.name!r} (builder {other.builder.name!r})")
  _CORPORA[corpus.name] = corpus
  return corpus


def entries(kind: str | None = None) -> list[Corpus]:
  """Every registered corpus (of `kind`, "image" or "text", if given), sorted by name."""
  return [c for _, c in sorted(_CORPORA.items()) if kind is None or c.kind == kind]


def names(kind: str | None = None) -> tuple[str, ...]:
  """The names of `entries(kind)`."""
  return tuple(c.name for c in entries(kind))


def get(name: str) -> Corpus:
  """The corpus called `name`.

  Raises:
    ConfigError: no corpus has that name (the message lists the known ones).
  """
  if name not in _CORPORA:
    raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(names())}")
  return _CORPORA[name]
