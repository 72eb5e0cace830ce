"""Every dataset big_embed can prepare, one module per corpus, and the registry that finds them.

    from big_embed.data import corpora
    corpora.get("wordnet").retrieval      # ("definition", "lemmas"): the text_retrieval evaluator's defaults
    corpora.names("text")                 # every text corpus

Importing this package imports each of its modules; a corpus module defines the TFDS builder of its dataset (its
readers, cleaning and split rule, documented in the module docstring and docs/datasets.md) and registers one
`registry.Corpus` entry with everything else about it (`registry.py`). Adding a corpus is adding one module here
that ends with `registry.register(registry.Corpus(...))`; modules that register nothing (shared readers) are
imported too and are harmless.
"""

from __future__ import annotations

import importlib
import pkgutil

from big_embed.data.corpora.registry import (FIELD_KINDS, TEXT_KINDS, Corpus, ImageText, entries, field_kind, get,
                                             names, register)

__all__ = ["FIELD_KINDS", "TEXT_KINDS", "Corpus", "ImageText", "entries", "field_kind", "get", "names", "register"]

for _module in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_module.name}")
