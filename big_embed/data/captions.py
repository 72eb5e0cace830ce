"""Caption templates and the random captions of training examples.

Fashion-MNIST images are captioned with a random prompt template filled with the class name; the
same templates are ensembled for zero-shot classification. Emoji are captioned with their CLDR name,
optionally wrapped or followed by two random keywords.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from big_embed.data import fashion_mnist

PROMPT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a {}.",
    "an item of clothing: {}.",
]

EMOJI_TEMPLATES: list[str] = [
    "{name}",
    "an emoji of {name}",
    "{name} emoji",
    "{name}: {keywords}",  # two random keywords, ", "-joined
]
_NUM_KEYWORDS = 2


def fashion_caption(label: int, rng: np.random.Generator) -> str:
  """Returns a random prompt template filled with the natural name of class `label`."""
  template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
  return template.format(fashion_mnist.PROMPT_NAMES[label])


def _other_keywords(name: str, keywords: Sequence[str]) -> list[str]:
  """Keywords that add something to `name` (the name itself is often one of them)."""
  return [k for k in keywords if k.lower() != name.lower()]


def emoji_caption(name: str, keywords: Sequence[str], rng: np.random.Generator) -> str:
  """Returns a random caption of an emoji from its CLDR name and keywords."""
  template = EMOJI_TEMPLATES[rng.integers(len(EMOJI_TEMPLATES))]
  if "{keywords}" in template:
    others = _other_keywords(name, keywords)
    if not others:
      return name
    picked = rng.choice(len(others), size=min(_NUM_KEYWORDS, len(others)), replace=False)
    return template.format(name=name, keywords=", ".join(others[i] for i in sorted(picked)))
  return template.format(name=name)


def all_fashion_captions() -> Iterator[str]:
  """Every caption a Fashion-MNIST training example can get."""
  for template in PROMPT_TEMPLATES:
    for name in fashion_mnist.PROMPT_NAMES:
      yield template.format(name)


def all_emoji_caption_texts(entries: Iterable[tuple[str, Sequence[str]]]) -> Iterator[str]:
  """Texts covering every word of every caption the (name, keywords) entries can get."""
  for name, keywords in entries:
    for template in EMOJI_TEMPLATES:
      yield template.format(name=name, keywords=", ".join(_other_keywords(name, keywords)))
