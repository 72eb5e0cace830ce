"""Contrastive and distillation losses, selectable by `config.loss.name` (see `registry`).

Every module of this package is imported here, and each loss module registers its losses (`registry.register`),
so adding a loss is adding one module. The contrastive losses are thin functions over the tiled similarity
engine (`engine`); `resolve` turns a recipe's partial loss config into the complete, validated one.
"""

from __future__ import annotations

import importlib
import pkgutil

from big_embed.losses.registry import LossSpec, get, loss_config, names, resolve, task_types  # noqa: F401


def import_loss_modules() -> None:
  """Imports every module on this package's path (again-imported modules are not re-run)."""
  for module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{module.name}")


import_loss_modules()
