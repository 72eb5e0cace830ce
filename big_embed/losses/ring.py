"""The ring pass: every shard's key block folded into the local row statistics, in memory that falls as 1/P.

Inside `shard_map` over P batch shards, `ring_pass(hop, state, fixed, block, shards)` computes

    state ← hop(state, fixed, block_h)   for h = 0, 1, …, P−1,   block_h = the key block of shard (i − h) mod P

passing the blocks forward round the ring with `lax.ppermute` (block_0 is this shard's own). `hop` is any function
of a per-row statistic state, the values that stay on this shard (`fixed`: the rows, the logit coefficients) and
one key block; the similarity engine's is its tiled key scan (`engine.reduce_rows(key_mode="ring")`).

Plain autodiff of the loop keeps every hop's block for the backward pass: P blocks, O(N·d) per shard, as much as
an all-gather. The pass has its own VJP instead (`jax.custom_vjp`), the ring backward of Inf-CL (Cheng et al.
2024, "Breaking the Memory Barrier", arXiv 2410.17243):

* forward: P hops, P−1 block transfers. Saved for the backward: the state before each hop ([P, R] per state leaf),
  `fixed` and the own block: O(N/P·d + N) per shard.
* backward, hops in reverse order (P−1 … 0), one `lax.scan` step each: receive block_h from shard i+1 (which held it
  at hop h+1: the blocks travel backward round the ring, recomputed instead of stored) together with the gradient
  buffer that travels with it; recompute the hop (`jax.vjp` of `hop`) against the cotangent of its output state;
  add the rows' gradient to a local accumulator and the block's to the buffer. After step 0 each shard holds its
  own block again, and the buffer has visited every shard: it is the whole gradient of the block's keys.

Per shard: two blocks and two gradient buffers (O(N/P·d)) plus the hop's own temporaries (O(R × tile) for the
engine). The price: the backward sends P blocks and P buffers (the first buffer still empty; 3P−1 transfers of a
block per pass in all, against the all-gather's and reduce-scatter's 2(P−1)) and runs every hop's forward once more
(for the engine one more `q·kᵀ` per tile: 5 matmuls of R × tile × d per tile instead of the all-gather path's 4).
Gradients flow to every float leaf of `state`, `fixed` and the block's `moving` part; integer and bool leaves get
none. Values that `hop` closes over (traced arrays a statistic's function captures) are hoisted into explicit
inputs (`_hoist`), so that they get their gradients and no traced value escapes into the backward. Only
first-order reverse mode is defined (no `jvp`, no second derivatives).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core

from big_embed.losses.spmd import Shards

Hop = Callable[[Any, Any, Any], Any]  # (state, fixed, block) -> state


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split(tree):
  """(float leaves, other leaves, treedef): two lists with None where the other list has the leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  return ([x if _is_float(x) else None for x in leaves], [None if _is_float(x) else x for x in leaves], treedef)


def _merge(floats, others, treedef):
  return jax.tree.unflatten(treedef, [o if f is None else f for f, o in zip(floats, others)])


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _hoist(fn, *args):
  """(fn_c, consts): fn_c(consts, *args) = fn(*args), with every value `fn` closes over in `consts`, of any dtype
  (`jax.closure_convert` hoists only the float ones; a closed-over int would escape into the backward)."""
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  out_tree = jax.tree.structure(out_shape)

  def fn_c(consts, *args):
    out = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(closed.jaxpr, list(consts)))(*jax.tree.leaves(args))
    return jax.tree.unflatten(out_tree, out)

  return fn_c, list(closed.consts)


def ring_pass(hop: Hop, state, fixed, block, shards: Shards):
  """Folds every shard's key block into `state`, passing the blocks round the ring (module docstring).

  Args:
    hop: (state, fixed, block) -> state; state leaves are [R] (or any shape that stays on the shard).
    state: the statistic state before the first block.
    fixed: pytree that stays on this shard (rows, coefficients); its float leaves are differentiable.
    block: (moving, frozen), this shard's key block: both travel round the ring; the float leaves of `moving`
      (the keys [N_local, d]) get gradients, `frozen` (indices, masks, stop-gradient targets) gets none.
    shards: the batch axes (inside `shard_map`); with one shard this is `hop(state, fixed, block)`.

  Returns:
    The state after all `shards.size` blocks.
  """
  if shards.size == 1:
    return hop(state, fixed, block)
  state, block = shards.varying((state, block))  # carried round the ring: one type on every shard
  hop_c, hoisted = _hoist(hop, state, fixed, block)
  fixed_f, fixed_o, fixed_def = _split((fixed, hoisted))

  def apply(state, fixed_f, fixed_o, block):
    fixed_, hoisted_ = _merge(fixed_f, fixed_o, fixed_def)
    return hop_c(hoisted_, state, fixed_, block)

  # Everything the ring uses is an argument: a traced value it closed over would escape into the backward.
  return _make_ring(apply, shards)(state, fixed_f, fixed_o, *block)


def _make_ring(apply, shards: Shards):
  """The custom-VJP ring of `apply(state, fixed_floats, fixed_others, (moving, frozen)) -> state`."""

  def forward(state, fixed_f, fixed_o, moving, frozen, keep: bool):
    """(final state, the state before each hop stacked [P, ...] if `keep`, else None)."""

    def step(carry, _):
      blk, st = carry
      blk = jax.tree.map(shards.to_next, blk)  # block_h: shard i−h's
      return (blk, apply(st, fixed_f, fixed_o, blk)), (st if keep else None)

    first = apply(state, fixed_f, fixed_o, (moving, frozen))
    (_, out), seen = lax.scan(step, ((moving, frozen), first), None, length=shards.size - 1)
    if keep:
      seen = jax.tree.map(lambda s0, s: jnp.concatenate([s0[None], s]), state, seen)
    return out, seen

  @jax.custom_vjp
  def ring(state, fixed_f, fixed_o, moving, frozen):
    return forward(state, fixed_f, fixed_o, moving, frozen, keep=False)[0]

  def ring_fwd(state, fixed_f, fixed_o, moving, frozen):
    out, seen = forward(state, fixed_f, fixed_o, moving, frozen, keep=True)
    return out, (seen, fixed_f, fixed_o, moving, frozen)

  def ring_bwd(res, g):
    seen, fixed_f, fixed_o, moving, frozen = res

    def step(carry, st):  # hop h = P−1 … 0; `st` is the state before it, `g` the cotangent of the state after it
      blk, buf, g, d_fixed = carry
      prev = lambda t: jax.tree.map(shards.to_prev, t)
      blk, buf = prev(blk), prev(buf)  # block_h and its gradient so far, from shard i+1 (it had them at hop h+1)
      _, vjp = jax.vjp(lambda s, f, m: apply(s, f, fixed_o, (m, blk[1])), st, fixed_f, blk[0])
      g, d_f, d_m = vjp(g)
      return (blk, _add(buf, d_m), g, _add(d_fixed, d_f)), None

    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    carry = ((moving, frozen), zeros(moving), g, zeros(fixed_f))
    (_, d_moving, g, d_fixed), _ = lax.scan(step, carry, seen, reverse=True)
    return g, d_fixed, None, d_moving, None  # no cotangent for the integer / bool / frozen inputs

  ring.defvjp(ring_fwd, ring_bwd)
  return ring
