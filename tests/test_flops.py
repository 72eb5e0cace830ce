"""The jaxpr FLOP counter (`train/flops.py`) against FLOPs counted by hand: matmuls, their gradients, scans (where
XLA's own count takes the loop body once), remat recomputation, shard_map bodies, cond and convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from big_embed.train import flops as flops_lib

B, D0, D1, D2 = 8, 16, 32, 4  # an MLP x [B, D0] -> [B, D1] -> [B, D2]
K = 5  # matmuls in the scan / unrolled chains


def _count(fn, *args):
  return flops_lib.count_flops(jax.make_jaxpr(fn)(*args))


def _xla_flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _mlp(w1, w2, x):
  return jnp.tanh(x @ w1) @ w2


MLP_ARGS = (jnp.ones((D0, D1)), jnp.ones((D1, D2)), jnp.ones((B, D0)))
F1, F2 = 2 * B * D0 * D1, 2 * B * D1 * D2  # the two matmuls, counted by hand


def test_mlp_forward_and_gradient():
  assert _count(_mlp, *MLP_ARGS).flops == F1 + F2
  # d/dw1, d/dw2 only: dW2 = h^T g (F2), dh = g W2^T (F2), dW1 = x^T dh (F1); no dx
  loss = lambda w1, w2, x: _mlp(w1, w2, x).sum()
  assert _count(jax.grad(loss, argnums=(0, 1)), *MLP_ARGS).flops == F1 + F2 + F2 + F2 + F1


def test_a_matmul_chain_agrees_with_xla():
  w = jnp.ones((K, D1, D1))
  x = jnp.ones((B, D1))

  def chain(w, x):
    for i in range(K):
      x = x @ w[i]
    return x

  assert _count(chain, w, x).flops == K * 2 * B * D1 * D1 == _xla_flops(chain, w, x)


def test_a_scan_counts_its_body_times_its_length_where_xla_counts_it_once():
  w = jnp.ones((K, D1, D1))
  x = jnp.ones((B, D1))
  scanned = lambda w, x: lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
  one = 2 * B * D1 * D1
  assert _count(scanned, w, x) == flops_lib.FlopCount(K * one)
  # The reason for the jaxpr count: XLA's cost analysis (JAX 0.10) takes the loop body once.
  assert _xla_flops(scanned, w, x) == pytest.approx(one, rel=0.01)
  # The backward scan too: forward K, then per step d carry (one) and d w (one).
  grad = jax.grad(lambda w, x: scanned(w, x).sum())
  assert _count(grad, w, x).flops == 3 * K * one


def test_remat_recomputation_is_counted():
  w, x = jnp.ones((D0, D1)), jnp.ones((B, D0))
  plain = lambda w: jnp.sin(x @ w).sum()
  remat = lambda w: jax.checkpoint(lambda w: jnp.sin(x @ w))(w).sum()
  one = 2 * B * D0 * D1
  assert _count(jax.grad(plain), w).flops == 2 * one  # forward + dW
  assert _count(jax.grad(remat), w).flops == 3 * one  # forward + the forward replayed in the backward + dW


def test_a_shard_map_body_counts_once_per_device():
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  x, w = jnp.ones((8 * B, D0)), jnp.ones((D0, D1))
  local = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
  assert _count(local, x, w).flops == 2 * 8 * B * D0 * D1 == _count(lambda x, w: x @ w, x, w).flops


def test_cond_takes_the_larger_branch_and_while_is_reported():
  x = jnp.ones((B, B))
  cond = lambda x: lax.cond(x.sum() > 0, lambda x: x @ x @ x, lambda x: x @ x, x)
  assert _count(cond, x).flops == 2 * (2 * B ** 3)
  loop = lambda x: lax.while_loop(lambda c: c.sum() < 1e9, lambda c: c @ c, x)
  assert _count(loop, x) == flops_lib.FlopCount(2 * B ** 3, uncounted_loops=1)


def test_a_patch_convolution_equals_its_matmul():
  """The ViT patch embedding: a stride-p convolution over p x p patches is a matmul of the flattened patches."""
  n, s, p, c = 2, 16, 4, 8
  images, kernel = jnp.ones((n, s, s, 3)), jnp.ones((p, p, 3, c))
  conv = lambda i, k: lax.conv_general_dilated(i, k, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches = n * (s // p) ** 2
  by_hand = 2 * patches * (p * p * 3) * c
  assert _count(conv, images, kernel).flops == by_hand
  assert _xla_flops(conv, images, kernel) == by_hand
  # Its kernel gradient (the images take none) has the same count.
  grad = jax.grad(lambda k: conv(images, k).sum())
  assert _count(grad, kernel).flops == 2 * by_hand


def test_dot_general_with_batch_dims():
  a, b = np.zeros((3, 5, 7)), np.zeros((3, 7, 2))  # batched [5, 7] @ [7, 2]
  assert flops_lib.dot_general_flops(a.shape, b.shape, (((2,), (1,)), ((0,), (0,)))) == 2 * 3 * 5 * 7 * 2
  assert _count(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b).flops == 2 * 3 * 5 * 7 * 2
