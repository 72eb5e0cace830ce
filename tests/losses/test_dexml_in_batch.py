"""dexml with in_batch_ids: positives are the in-batch labels that share the row's id (a direct JAX reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.losses import util


def _naive_decoupled(q, k, ids, scale):
  """mean_i mean_{p: id_p = id_i} −log(e^{ℓ_ip} / (e^{ℓ_ip} + Σ_{l: id_l ≠ id_i} e^{ℓ_il})), full matrix."""
  logits = scale * q @ k.T  # [B, B]
  same = ids[:, None] == ids[None, :]
  neg_lse = jax.nn.logsumexp(jnp.where(same, -jnp.inf, logits), axis=1, keepdims=True)  # [B, 1]
  per_pair = jnp.logaddexp(logits, neg_lse) - logits  # −log decoupled probability of each column
  return jnp.mean(jnp.sum(jnp.where(same, per_pair, 0.0), axis=1) / jnp.sum(same, axis=1))


@pytest.mark.parametrize("devices,tile", [(1, 5), (8, 3)])
def test_in_batch_ids_matches_reference(devices, tile):
  rng = np.random.default_rng(1)
  b, d = 24, 6
  q = rng.normal(size=(b, d)).astype(np.float32)
  k = rng.normal(size=(b, d)).astype(np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  k /= np.linalg.norm(k, axis=1, keepdims=True)
  ids = rng.integers(0, 6, size=b).astype(np.int32)  # several rows per class, as with Fashion-MNIST
  loss, _, grads, _ = util.run("dexml", devices, {"image": q, "text": k}, {"ids": ids},
                               query_tower="image", label_tower="text", in_batch_ids=True, temperature=0.1,
                               tile_size=tile)
  want, (gq, gk) = jax.value_and_grad(_naive_decoupled, argnums=(0, 1))(q, k, ids, 10.0)
  util.assert_close(loss, want, "value")
  util.assert_close(grads["image"], gq, "grad image")
  util.assert_close(grads["text"], gk, "grad text")
