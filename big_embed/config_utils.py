"""Helpers for recipe files: build one recipe on top of another."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def load_recipe(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """Runs `get_config(arg)` of the recipe file at `path` (e.g. a sibling: `Path(__file__).with_name(...)`)."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"big_embed_recipe_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)
