"""Row-keyed dropout: the mask of a batch row depends only on the call's dropout key, the site and the row's index.

A model draws one key per call (`call_key`) and hands each tower a `RowKeys` (`row_keys`): that key with the
input's site folded in, and the global index of every row. Each dropout site folds its own constant into the
key (`fold`), and `row_dropout` draws row r's mask from `fold_in(key, row_ids[r])` alone. So the same rows give
the same masks whichever other rows share the forward pass: embedding a batch at once or chunk by chunk (gradient
caching re-runs each chunk's forward) computes the same thing, dropout on. `None` instead of a `RowKeys` means
dropout off (evaluation, or no "dropout" RNG given to `apply`).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from big_embed.errors import ConfigError


@flax.struct.dataclass
class RowKeys:
  """The randomness of one dropout-on forward pass over N rows."""

  key: jax.Array  # a PRNG key (of the model, the input and every site folded in so far)
  row_ids: jax.Array  # int32 [N]: the global index of each row


def fold(rows: RowKeys | None, site) -> RowKeys | None:
  """`rows` with `site` (an int, or an int32 scalar such as a scanned layer index) folded into its key."""
  return None if rows is None else RowKeys(jax.random.fold_in(rows.key, site), rows.row_ids)


def row_dropout(x: jax.Array, rate: float, rows: RowKeys | None) -> jax.Array:
  """Inverted dropout of x [N, ...] whose row r keeps each entry with probability 1 - rate, drawn from
  `fold_in(rows.key, rows.row_ids[r])` alone. The identity when `rows` is None or `rate` is 0."""
  if rows is None or rate == 0.0:
    return x
  if rows.row_ids.shape != x.shape[:1]:
    raise ValueError(f"dropout over {x.shape[0]} rows got {rows.row_ids.shape} row ids; give one id per row")
  keep_prob = 1.0 - rate
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rows.key, rows.row_ids)
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, keep_prob, x.shape[1:]))(keys)  # [N, ...]
  return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def call_key(module: nn.Module) -> jax.Array | None:
  """The dropout key of one call of `module` (one `make_rng("dropout")`: draw it once per `__call__`), None without
  a "dropout" RNG (evaluation)."""
  return module.make_rng("dropout") if module.has_rng("dropout") else None


def row_keys(key: jax.Array | None, row_ids: jax.Array | None, num_rows: int, site: int) -> RowKeys | None:
  """The RowKeys of the call's input number `site` (N = `num_rows` rows), None when `key` is None (no dropout).
  `row_ids` int [N] gives each row's global index (None: 0..N-1)."""
  if key is None:
    return None
  if row_ids is None:
    row_ids = jnp.arange(num_rows, dtype=jnp.int32)
  row_ids = jnp.asarray(row_ids, jnp.int32)
  if row_ids.shape != (num_rows,):
    raise ValueError(f"row_ids has shape {row_ids.shape} but the input has {num_rows} rows; give one id per row")
  return RowKeys(jax.random.fold_in(key, site), row_ids)


def expand_rows(rows: RowKeys | None, per_row: int) -> RowKeys | None:
  """`rows` for an input of `per_row` entries per row, flattened row-major (hard negatives [B, H] -> [B * H]):
  entry h of row r gets the id r * per_row + h, which no other row's entries share."""
  if rows is None:
    return None
  ids = rows.row_ids[:, None] * per_row + jnp.arange(per_row, dtype=jnp.int32)  # [B, H]
  return RowKeys(rows.key, ids.reshape(-1))


def check_rate(value, field: str) -> float:
  """`value` as a float dropout rate; raises a ConfigError naming `field` (e.g. "config.model.dropout") unless
  0 <= value < 1."""
  try:
    rate = float(value)
  except (TypeError, ValueError):
    rate = None
  if rate is None or not 0.0 <= rate < 1.0:
    raise ConfigError(f"{field}={value!r} is not a dropout rate; use a number in [0, 1) (0 = no dropout)")
  return rate
