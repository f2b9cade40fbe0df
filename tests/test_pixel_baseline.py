import numpy as np
from sklearn.linear_model import LogisticRegression, Ridge

from affect_jax import pixel_baseline


def test_ridge_matches_sklearn():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 10))
  y = x @ rng.normal(size=(10, 2)) + 3.0 + 0.1 * rng.normal(size=(200, 2))
  w, b = pixel_baseline.fit_ridge(x, y, l2=5.0)
  ref = Ridge(alpha=5.0).fit(x, y)
  np.testing.assert_allclose(w, ref.coef_.T, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6)


def test_logistic_agrees_with_sklearn_and_ignores_masked_rows():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 5)).astype(np.float32)
  y = np.argmax(x[:, :3] + 0.3 * rng.normal(size=(300, 3)), axis=1)
  mask = np.ones(300, np.float32)
  mask[:40] = 0
  y_noisy = y.copy()
  y_noisy[:40] = 2  # garbage labels on masked rows must not matter
  w, b = pixel_baseline.fit_logistic(x, y_noisy, mask, multiclass=True, num_outputs=3,
                                     l2=1e-4, steps=500)
  ref = LogisticRegression(C=1e3, max_iter=2000).fit(x[40:], y[40:])
  agree = np.mean(np.argmax(x @ w + b, -1) == ref.predict(x))
  assert agree > 0.97
