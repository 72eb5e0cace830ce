"""Linear probe: a multinomial logistic regression trained on frozen embeddings, and its test accuracy.

The probe minimises the mean softmax cross-entropy plus (weight_decay / 2) · ||W||² (the bias is not penalised)
on standardised features with full-batch Adam from a zero init, for a fixed number of steps, so its result is
deterministic. This is the objective of scikit-learn's `LogisticRegression(C=1 / (weight_decay · N))` on the same
standardised features, N being the number of training examples.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class LogisticProbe(NamedTuple):
  """A trained probe: logits(x) = ((x - mean) / std) @ w + b."""

  mean: np.ndarray  # [D] training-set feature mean
  std: np.ndarray  # [D] training-set feature std (floored at 1e-6)
  w: np.ndarray  # [D, C]
  b: np.ndarray  # [C]

  def logits(self, x) -> np.ndarray:
    """[M, C] class logits of features x [M, D]."""
    return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.w + self.b

  def predict(self, x) -> np.ndarray:
    """[M] predicted class ids of features x [M, D] (ties go to the lower class id)."""
    return np.argmax(self.logits(x), axis=1)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "weight_decay"))
def _train_probe(x, y, *, num_classes: int, steps: int, learning_rate: float, weight_decay: float):
  """Full-batch Adam on softmax cross-entropy + (weight_decay / 2) ||W||²; zero init. x [N, D], y [N]."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adam(learning_rate)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]  # [N, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  def step(_, carry):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
  return params


def _check_xy(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float32), np.asarray(y)
  if x.ndim != 2 or y.shape != (len(x),):
    raise ValueError(f"{name}_x must be [N, D] and {name}_y [N]; got {x.shape} and {y.shape}")
  if not len(x):
    raise ValueError(f"{name} set is empty")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f"{name}_y must hold non-negative integer class ids, got dtype {y.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}_x contains NaN or inf")
  return x, y.astype(np.int32)


def _check_num_classes(num_classes: int | None, seen: int) -> int:
  """`num_classes`, or `seen` (1 + the largest class id) when None; ValueError if a class id is out of range."""
  num_classes = seen if num_classes is None else int(num_classes)
  if num_classes < seen:
    raise ValueError(f"num_classes={num_classes} but class id {seen - 1} occurs")
  return num_classes


def fit_linear_probe(train_x, train_y, *, num_classes: int | None = None, steps: int = 500,
                     learning_rate: float = 1e-2, weight_decay: float = 1e-4) -> LogisticProbe:
  """Trains the probe (module docstring) on features train_x [N, D] with class ids train_y [N].

  Args:
    train_x, train_y: the training set.
    num_classes: C; defaults to 1 + the largest class id in train_y.
    steps, learning_rate, weight_decay: the optimisation (Adam) settings.
  Returns:
    The trained `LogisticProbe`, standardising with the training set's per-dimension mean and std.
  """
  train_x, train_y = _check_xy(train_x, train_y, "train")
  num_classes = _check_num_classes(num_classes, int(train_y.max()) + 1)
  if int(steps) < 1 or learning_rate <= 0 or weight_decay < 0:
    raise ValueError(f"need steps >= 1, learning_rate > 0, weight_decay >= 0; got {steps}, {learning_rate}, "
                     f"{weight_decay}")
  mean = train_x.mean(axis=0)
  std = np.maximum(train_x.std(axis=0), 1e-6)
  params = _train_probe(jnp.asarray((train_x - mean) / std), jnp.asarray(train_y), num_classes=num_classes,
                        steps=int(steps), learning_rate=float(learning_rate), weight_decay=float(weight_decay))
  return LogisticProbe(mean, std, np.asarray(params["w"]), np.asarray(params["b"]))


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int | None = None, steps: int = 500,
                          learning_rate: float = 1e-2, weight_decay: float = 1e-4) -> float:
  """Test accuracy in [0, 1] of the probe trained by `fit_linear_probe` on (train_x, train_y).

  Args:
    train_x: [N, D] float; train_y: [N] int class ids. test_x: [M, D]; test_y: [M].
    num_classes: defaults to 1 + the largest class id seen in either split.
    steps, learning_rate, weight_decay: as in `fit_linear_probe`.
  """
  train_x, train_y = _check_xy(train_x, train_y, "train")
  test_x, test_y = _check_xy(test_x, test_y, "test")
  if train_x.shape[1] != test_x.shape[1]:
    raise ValueError(f"train and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
  num_classes = _check_num_classes(num_classes, int(max(train_y.max(), test_y.max())) + 1)
  probe = fit_linear_probe(train_x, train_y, num_classes=num_classes, steps=steps, learning_rate=learning_rate,
                           weight_decay=weight_decay)
  return float(np.mean(probe.predict(test_x) == test_y))
