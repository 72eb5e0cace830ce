"""The linear probe against scikit-learn's LogisticRegression on the same objective, and its input checks.

The probe minimises mean cross-entropy + (weight_decay / 2) ||W||² on standardised features; scikit-learn's
multinomial LogisticRegression minimises C · sum of cross-entropies + ||W||² / 2, the same objective up to a
constant factor when C = 1 / (weight_decay · N). Both leave the bias unpenalised.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from sklearn import linear_model

from big_embed.evaluate import text_metrics as tm


def _problem(seed: int, n: int, num_classes: int, dim: int, spread: float, priors=None):
  """Overlapping Gaussian clusters (not separable, so both optimisers have a finite optimum)."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_classes, dim))
  y = rng.choice(num_classes, n, p=priors)
  return (centres[y] + spread * rng.standard_normal((n, dim))).astype(np.float32), y


def _sklearn_probe(train_x, train_y, weight_decay):
  """(predict_proba, predict) of scikit-learn's fit of the same objective on independently standardised features."""
  mean, std = train_x.mean(axis=0), train_x.std(axis=0)
  model = linear_model.LogisticRegression(C=1.0 / (weight_decay * len(train_x)), tol=1e-12, max_iter=10_000)
  model.fit((train_x - mean) / std, train_y)
  return (lambda x: model.predict_proba((x - mean) / std)), (lambda x: model.predict((x - mean) / std))


@pytest.mark.parametrize("weight_decay,priors", [
    # Balanced classes, mild decay (a probe that ignored it is 0.27 off in probability, 2.5% off in predictions).
    (1e-2, None),
    # Strong decay on imbalanced classes: the penalty moves predictions towards the frequent classes, so a probe
    # that ignored it would disagree with scikit-learn on ~14% of the test points.
    (0.1, [0.4, 0.3, 0.15, 0.1, 0.05]),
])
def test_probe_matches_sklearn_logistic_regression(weight_decay, priors):
  # Both converge here at the probe's default 500 steps. (At the evaluator's default weight_decay=1e-4 they do
  # not: the nearly unregularised optimum is far, and 500 Adam steps stop short of it.)
  x, y = _problem(1, 800, 5, 16, 1.5, priors)
  train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
  sk_proba, sk_predict = _sklearn_probe(train_x, train_y, weight_decay)
  want_pred = sk_predict(test_x)
  want_acc = np.mean(want_pred == test_y)
  assert want_acc > 0.5  # chance is at most 0.4: the problem carries signal

  probe = tm.fit_linear_probe(train_x, train_y, num_classes=5, weight_decay=weight_decay)  # default 500 steps
  pred = probe.predict(test_x)
  assert np.mean(pred == want_pred) >= 0.98
  np.testing.assert_allclose(special.softmax(probe.logits(test_x), axis=1), sk_proba(test_x), atol=0.02)
  acc = tm.linear_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay=weight_decay)
  assert acc == pytest.approx(want_acc, abs=0.01)
  assert acc == np.mean(pred == test_y)  # the accuracy is that of the fitted probe's predictions


def test_probe_separable_and_deterministic():
  x, y = _problem(0, 400, 4, 16, 0.1)
  assert tm.linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:], steps=200) == 1.0
  # Class ids the training split never uses still get a (never predicted) logit column.
  probe = tm.fit_linear_probe(x[:300], y[:300], num_classes=6, steps=200)
  assert probe.w.shape == (16, 6) and set(probe.predict(x[300:])) <= set(y[:300])
  again = tm.fit_linear_probe(x[:300], y[:300], num_classes=6, steps=200)
  np.testing.assert_array_equal(probe.w, again.w)


def test_probe_errors():
  x, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
  with pytest.raises(ValueError, match="width"):
    tm.linear_probe_accuracy(x, y, np.zeros((2, 5)), y[:2])
  with pytest.raises(ValueError, match="integer class ids"):
    tm.linear_probe_accuracy(x, y.astype(float), x, y)
  with pytest.raises(ValueError, match="num_classes=1"):
    tm.linear_probe_accuracy(x, y, x, y, num_classes=1)
  with pytest.raises(ValueError, match="num_classes=1"):
    tm.fit_linear_probe(x, y, num_classes=1)
  with pytest.raises(ValueError, match="train_x must be"):
    tm.linear_probe_accuracy(x, y[:3], x, y)
  with pytest.raises(ValueError, match="test_x contains NaN"):
    tm.linear_probe_accuracy(x, y, np.full((4, 3), np.nan), y)
  with pytest.raises(ValueError, match="weight_decay >= 0"):
    tm.fit_linear_probe(x, y, weight_decay=-1.0)
