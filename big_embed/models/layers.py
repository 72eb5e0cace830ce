"""A tower's stack of identical blocks: unrolled or scanned (`config.model.scan_layers`), rematerialised or not
(`config.model.remat`), and the conversion of params between the two layouts.

Unrolled, block i is the submodule `UNROLLED[stack].format(i)` ("block3", "layer_3"); scanned (`nn.scan`), the
blocks are one submodule `stack` ("blocks", "layers") whose params carry a leading [depth] axis with the logical
name "layers". `parallel.sharding` maps a logical name without a rule to no mesh axis, so a stacked param is
replicated over the layers and sharded over fsdp / tensor exactly like one unrolled block's. Block i folds i into
its dropout key either way, so both layouts compute the same numbers, dropout included.

remat: "none" keeps every activation for the backward; "block" (`nn.remat`) keeps only each block's input and
recomputes the block in the backward; "dots" keeps the outputs of the blocks' weight matmuls
(`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: the Dense projections, each O(B·T·D)) and recomputes
the rest: the attention scores and probabilities (dot_generals with batch dims, O(B·heads·T²)), LayerNorms, GELUs
and dropout masks, which are cheap to recompute or the largest to keep. Measured on XLA's CPU backend
(benchmarks/RESULTS.md), remat lowers memory only with scan_layers: unrolled, the recomputation is scheduled early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_embed import config_schema
from big_embed.errors import ConfigError
from big_embed.models import dropout as dropout_lib
from big_embed.parallel import sharding

REMATS = config_schema.REMATS
# Scanned submodule name -> the name of unrolled block i.
UNROLLED = {"blocks": "block{}", "layers": "layer_{}"}
LAYER_AXIS = "layers"  # the logical name of a scanned param's leading axis


def stack_fields(model_config: ml_collections.ConfigDict) -> dict:
  """The tower fields `remat` and `scan_layers` of `config.model` (defaults where a config saved before they
  existed lacks them).

  Raises:
    ConfigError: remat is not one of `REMATS`, or scan_layers is not a bool.
  """
  remat = model_config.get("remat", "none")
  scan = model_config.get("scan_layers", False)
  if remat not in REMATS:
    raise ConfigError(f"config.model.remat={remat!r} is not one of {', '.join(map(repr, REMATS))}")
  if not isinstance(scan, bool):
    raise ConfigError(f"config.model.scan_layers={scan!r} must be True or False")
  return {"remat": remat, "scan_layers": scan}


def _remat(block: type[nn.Module], remat: str, scan: bool) -> type[nn.Module]:
  if remat not in REMATS:
    raise ValueError(f"remat={remat!r} is not one of {REMATS}")
  if remat == "none":
    return block
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
  # Inside a scan, the loop already keeps XLA from merging the forward into the recomputation.
  return nn.remat(block, policy=policy, prevent_cse=not scan)


def _batch_split(block: type[nn.Module]) -> type[nn.Module]:
  """`block` with its input and output constrained to the batch axes (`sharding.constrain_batch`): under FSDP the
  compiler would otherwise follow the weights' "embed" sharding into the activations and keep the batch whole."""

  class Split(block):  # pylint: disable=missing-class-docstring

    def __call__(self, x, *args):
      return sharding.constrain_batch(block.__call__(self, sharding.constrain_batch(x), *args))

  return Split


def _scan_body(block: type[nn.Module]) -> type[nn.Module]:
  """`block` with nn.scan's signature: (x, mask, rows, layer) -> (x, None); block i folds i into `rows`."""

  class Body(block):  # pylint: disable=missing-class-docstring

    def __call__(self, x, mask, rows, layer):  # pylint: disable=arguments-differ
      return block.__call__(self, x, mask, dropout_lib.fold(rows, layer)), None

  return Body


def apply_stack(block: type[nn.Module], block_fields: dict, x, mask, rows, *, depth: int, stack: str,
                remat: str = "none", scan: bool = False):
  """Runs `depth` blocks `block(**block_fields)(x, mask, rows)` one after the other; call it from the tower's
  compact `__call__`. Block i sees `fold(rows, i)`.

  Args:
    block: a module class whose `__call__(x, mask, rows)` returns the new x (same shape and dtype).
    block_fields: the block's fields.
    x: the blocks' input, e.g. [B, T, D].
    mask: the attention mask (or None), the same for every block.
    rows: the tower's `dropout.RowKeys`, None without dropout.
    depth: the number of blocks.
    stack: the scanned submodule's name, a key of `UNROLLED`.
    remat: one of `REMATS`.
    scan: `nn.scan` over the blocks (params stacked) instead of unrolling them.

  Returns:
    The last block's output.
  """
  block = _batch_split(block)
  if not scan:
    cls = _remat(block, remat, scan=False)
    for i in range(depth):
      x = cls(**block_fields, name=UNROLLED[stack].format(i))(x, mask, dropout_lib.fold(rows, i))
    return x
  scanned = nn.scan(_remat(_scan_body(block), remat, scan=True), variable_axes={"params": 0},
                    split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast, 0), length=depth,
                    metadata_params={nn.PARTITION_NAME: LAYER_AXIS})
  x, _ = scanned(**block_fields, name=stack)(x, mask, rows, jnp.arange(depth, dtype=jnp.int32))
  return x


def _is_tree(x) -> bool:
  return isinstance(x, (Mapping, ml_collections.ConfigDict))


def _stack(leaves):
  if any(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def stack_layers(params: Any) -> Any:
  """Params of unrolled towers (`layer_0`, `layer_1`, ... / `block0`, ...) in the scanned layout: each run of
  blocks becomes one subtree (`layers` / `blocks`) whose leaves are the blocks' leaves stacked on a new leading
  axis. NumPy leaves stay NumPy; other subtrees are unchanged. The inverse of `unstack_layers`. Both take
  unboxed params (plain arrays, as restored or loaded), not `nn.Partitioned` boxes."""
  if not _is_tree(params):
    return params
  out = {k: stack_layers(v) for k, v in params.items()}
  for stack, name in UNROLLED.items():
    depth = 0
    while name.format(depth) in out:
      depth += 1
    if not depth:
      continue
    blocks = [out.pop(name.format(i)) for i in range(depth)]
    if stack in out:
      raise ValueError(f"params have both {name.format(0)!r} and {stack!r}: not one layout")
    structure = jax.tree.structure(blocks[0])
    if any(jax.tree.structure(b) != structure for b in blocks[1:]):
      raise ValueError(f"the blocks {name.format('*')} of the params differ in structure; they cannot be stacked")
    out[stack] = jax.tree.map(lambda *xs: _stack(xs), *blocks)
  return out


def unstack_layers(params: Any) -> Any:
  """Params of scanned towers in the unrolled layout: each `layers` / `blocks` subtree with leaves [depth, ...]
  becomes `layer_0` ... / `block0` ... . The inverse of `stack_layers`."""
  if not _is_tree(params):
    return params
  out = {k: unstack_layers(v) for k, v in params.items()}
  for stack, name in UNROLLED.items():
    if stack not in out or not _is_tree(out[stack]):
      continue
    tree = out.pop(stack)
    depth = jax.tree.leaves(tree)[0].shape[0]
    for i in range(depth):
      out[name.format(i)] = jax.tree.map(lambda x, i=i: x[i], tree)
  return out


def is_scanned(params: Any) -> bool:
  """Whether `params` hold scanned towers (a `layers` / `blocks` subtree) anywhere."""
  if not _is_tree(params):
    return False
  return any(k in UNROLLED for k in params) or any(is_scanned(v) for v in params.values())


def to_layout(params: Any, scan_layers: bool) -> Any:
  """`params` (either layout) in the layout of a model with `config.model.scan_layers=scan_layers`."""
  scanned = is_scanned(params)
  if scan_layers and not scanned:
    return stack_layers(params)
  if scanned and not scan_layers:
    return unstack_layers(params)
  return params


def check_same_layout(saved_model_config, model_config) -> None:
  """Raises a ConfigError when a checkpoint written with `saved_model_config` (its config.model) has the other
  layer layout than `model_config`: a full train state (optimizer moments included) is restored as it was saved."""
  saved = bool(saved_model_config.get("scan_layers", False))
  wanted = bool(model_config.get("scan_layers", False))
  if saved != wanted:
    raise ConfigError(f"config.model.scan_layers={wanted} but the checkpoint was written with scan_layers={saved}; "
                      f"resume with --config.model.scan_layers={saved} (or use a new --workdir)")
