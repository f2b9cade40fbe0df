"""Masked losses against numpy formulas written out here, finite differences and masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from affect_jax import losses
from affect_jax.data.affwild2 import INVALID_AU, INVALID_EXPR, INVALID_VA

SETTINGS = settings(max_examples=30, deadline=None)


def _np_ccc(x, y):
  """ABAW's official formulation (Pearson rho times spreads), float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  rho = np.corrcoef(x, y)[0, 1]
  return 2 * rho * x.std() * y.std() / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def _va_batch(rng, b=3, t=20):
  """[B, T, 2] pred/label and a [B, T] mask with padded tails and -5 labels."""
  label = rng.uniform(-1, 1, (b, t, 2)).astype(np.float32)
  pred = (0.6 * label + rng.normal(0, 0.3, label.shape)).astype(np.float32)
  mask = np.ones((b, t), np.float32)
  for i, length in enumerate(rng.integers(t // 2, t + 1, b)):
    mask[i, length:] = 0
    label[i, length:] = INVALID_VA
  label[0, 1, 0] = INVALID_VA
  mask[0, 1] = 0
  return pred, label, mask


# ---- CCC ----


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_ccc_loss_matches_numpy(seed):
  pred, label, mask = _va_batch(np.random.default_rng(seed))
  keep = mask > 0
  expected = 1 - np.mean([_np_ccc(pred[..., d][keep], label[..., d][keep]) for d in range(2)])
  np.testing.assert_allclose(losses.ccc_loss(pred, label, mask), expected, rtol=1e-5, atol=1e-6)


def test_ccc_loss_drops_invalid_labels_even_when_mask_is_one():
  pred, label, mask = _va_batch(np.random.default_rng(0))
  frame_mask = losses.valid_mask_va(label)
  np.testing.assert_allclose(
      losses.ccc_loss(pred, label, np.ones_like(mask)),
      losses.ccc_loss(pred, label, frame_mask),
      rtol=1e-6)


def test_ccc_loss_masked_frames_change_nothing():
  rng = np.random.default_rng(1)
  pred, label, mask = _va_batch(rng)
  pred2, label2 = pred.copy(), label.copy()
  out = mask == 0
  pred2[out] = rng.normal(0, 100, (out.sum(), 2))
  label2[out] = rng.normal(0, 100, (out.sum(), 2))
  (i, j), (k, l) = np.argwhere(out)[:2]
  pred2[i, j] = [np.nan, np.inf]
  label2[k, l] = np.nan

  value_and_grad = jax.value_and_grad(losses.ccc_loss, argnums=(0, 1))
  v1, (gp1, gl1) = value_and_grad(pred, label, mask)
  v2, (gp2, gl2) = value_and_grad(pred2, label2, mask)
  np.testing.assert_array_equal(v1, v2)
  for g1, g2 in ((gp1, gp2), (gl1, gl2)):
    assert np.all(np.isfinite(g2))
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(np.asarray(g2)[out], 0)


def test_ccc_loss_no_valid_frame_is_zero_with_zero_grad():
  pred = jnp.ones((2, 5, 2))
  label = jnp.full((2, 5, 2), INVALID_VA)
  for mask in (jnp.zeros((2, 5)), jnp.ones((2, 5))):
    value, grad = jax.value_and_grad(losses.ccc_loss)(pred, label, mask)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0)


def test_ccc_loss_constant_series_is_finite():
  zeros = jnp.zeros((4, 2))
  value, grad = jax.value_and_grad(losses.ccc_loss)(zeros, zeros, jnp.ones(4))
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_ccc_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  pred, label, mask = _va_batch(rng, b=2, t=6)
  with jax.enable_x64(True):
    pred64, label64 = jnp.asarray(pred, jnp.float64), jnp.asarray(label, jnp.float64)
    loss = lambda p: losses.ccc_loss(p, label64, mask, eps=0.0)
    grad = np.asarray(jax.grad(loss)(pred64))
    assert grad.dtype == np.float64
    h = 1e-6
    numeric = np.zeros_like(grad)
    for idx in np.ndindex(pred.shape):
      step = np.zeros(pred.shape)
      step[idx] = h
      numeric[idx] = (loss(pred64 + step) - loss(pred64 - step)) / (2 * h)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


# ---- Cross-entropy ----


def _np_cross_entropy(logits, labels, mask, weights=None, smoothing=0.0):
  """PyTorch CrossEntropyLoss(weight, label_smoothing) mean, one frame at a time."""
  logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  labels, mask = np.asarray(labels).ravel(), np.asarray(mask).ravel()
  c = logits.shape[-1]
  w = np.ones(c) if weights is None else np.asarray(weights, np.float64)
  total, norm = 0.0, 0.0
  for z, y, m in zip(logits, labels, mask):
    if not m or y < 0:
      continue
    log_p = z - z.max() - np.log(np.sum(np.exp(z - z.max())))
    target = np.full(c, smoothing / c)
    target[y] += 1 - smoothing
    total += -np.sum(w * target * log_p)
    norm += w[y]
  return total / norm if norm else 0.0


@pytest.mark.parametrize("use_weights", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_numpy(use_weights, smoothing):
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (4, 10, 8)).astype(np.float32)
  labels = rng.integers(0, 8, (4, 10))
  labels[rng.random((4, 10)) < 0.2] = INVALID_EXPR
  mask = losses.valid_mask_expr(labels) * (rng.random((4, 10)) < 0.9)  # plus some padding
  weights = rng.uniform(0.2, 3, 8).astype(np.float32) if use_weights else None
  got = losses.masked_cross_entropy(
      logits, labels, mask, class_weights=weights, label_smoothing=smoothing)
  assert got.dtype == jnp.float32
  expected = _np_cross_entropy(logits, labels, mask, weights, smoothing)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_cross_entropy_masked_frames_change_nothing():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 1, (3, 7, 8)).astype(np.float32)
  labels = rng.integers(0, 8, (3, 7))
  mask = (rng.random((3, 7)) < 0.7).astype(np.float32)
  logits2, labels2 = logits.copy(), labels.copy()
  logits2[mask == 0] = rng.normal(0, 100, ((mask == 0).sum(), 8))
  logits2[np.argwhere(mask == 0)[0][0], np.argwhere(mask == 0)[0][1], 0] = np.nan
  labels2[mask == 0] = INVALID_EXPR
  weights = np.linspace(0.5, 2, 8)

  value_and_grad = jax.value_and_grad(losses.masked_cross_entropy)
  v1, g1 = value_and_grad(logits, labels, mask, weights, 0.1)
  v2, g2 = value_and_grad(logits2, labels2, mask, weights, 0.1)
  np.testing.assert_array_equal(v1, v2)
  assert np.all(np.isfinite(g2))
  np.testing.assert_array_equal(g1, g2)
  np.testing.assert_array_equal(np.asarray(g2)[mask == 0], 0)


def test_cross_entropy_no_valid_frame_is_zero_with_zero_grad():
  logits = jnp.ones((2, 3, 8))
  labels = jnp.full((2, 3), INVALID_EXPR)
  value, grad = jax.value_and_grad(losses.masked_cross_entropy)(
      logits, labels, jnp.ones((2, 3)), jnp.ones(8))
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0)


# ---- BCE ----


def _np_bce(logits, labels, mask, pos_weight=None):
  """PyTorch BCEWithLogitsLoss(pos_weight) mean over valid elements; log-sigmoid via logaddexp."""
  x = np.asarray(logits, np.float64)
  y = np.asarray(labels, np.float64)
  pw = np.ones(x.shape[-1]) if pos_weight is None else np.asarray(pos_weight, np.float64)
  log_sig, log_not_sig = -np.logaddexp(0, -x), -np.logaddexp(0, x)
  per_element = -(pw * y * log_sig + (1 - y) * log_not_sig)
  valid = (np.asarray(mask)[..., None] > 0) & (y >= 0)
  return per_element[valid].mean() if valid.any() else 0.0


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("use_pos_weight", [False, True])
def test_bce_matches_numpy(scale, use_pos_weight):
  rng = np.random.default_rng(5)
  logits = (scale * rng.normal(0, 1, (3, 9, 12))).astype(np.float32)
  labels = (rng.random((3, 9, 12)) < 0.3).astype(np.int32)
  labels[rng.random((3, 9)) < 0.2, 0] = INVALID_AU
  mask = losses.valid_mask_au(labels) * (rng.random((3, 9)) < 0.9)
  pos_weight = rng.uniform(0.5, 5, 12).astype(np.float32) if use_pos_weight else None
  got = losses.masked_bce_with_logits(logits, labels, mask, pos_weight)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_bce(logits, labels, mask, pos_weight), rtol=1e-5)


def test_bce_large_logits_are_stable():
  logits = jnp.array([[100.0, -100.0]])
  labels = jnp.array([[0, 1]])
  value, grad = jax.value_and_grad(losses.masked_bce_with_logits)(
      logits, labels, jnp.ones(1), jnp.array([1.0, 2.0]))
  # Confidently wrong: -log(1 - sigmoid(100)) = 100 and 2 * -log(sigmoid(-100)) = 200.
  np.testing.assert_allclose(value, (100 + 200) / 2, rtol=1e-6)
  np.testing.assert_allclose(grad, [[0.5, -1.0]], rtol=1e-6)


def test_bce_masked_frames_change_nothing_and_empty_is_zero():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 1, (4, 12)).astype(np.float32)
  labels = (rng.random((4, 12)) < 0.5).astype(np.int32)
  mask = np.array([1, 0, 1, 0], np.float32)
  logits2, labels2 = logits.copy(), labels.copy()
  logits2[1] = np.nan
  labels2[3] = INVALID_AU
  value_and_grad = jax.value_and_grad(losses.masked_bce_with_logits)
  v1, g1 = value_and_grad(logits, labels, mask)
  v2, g2 = value_and_grad(logits2, labels2, mask)
  np.testing.assert_array_equal(v1, v2)
  np.testing.assert_array_equal(g1, g2)
  np.testing.assert_array_equal(np.asarray(g2)[mask == 0], 0)

  value, grad = value_and_grad(logits2, labels2, np.zeros(4))
  assert value == 0.0
  np.testing.assert_array_equal(grad, 0)


# ---- Shared behaviour ----


def test_bfloat16_inputs_give_float32_losses():
  rng = np.random.default_rng(7)
  pred, label, mask = _va_batch(rng)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  ccc = losses.ccc_loss(bf(pred), bf(label), mask)
  assert ccc.dtype == jnp.float32
  f32 = lambda x: bf(x).astype(jnp.float32)
  np.testing.assert_allclose(ccc, losses.ccc_loss(f32(pred), f32(label), mask))

  logits = rng.normal(0, 2, (2, 5, 8))
  labels = rng.integers(0, 8, (2, 5))
  bool_mask = jnp.ones((2, 5), jnp.bool_)
  ce = losses.masked_cross_entropy(bf(logits), labels, bool_mask, label_smoothing=0.1)
  assert ce.dtype == jnp.float32
  au_logits = rng.normal(0, 2, (2, 5, 12))
  au_labels = rng.integers(0, 2, (2, 5, 12))
  bce = losses.masked_bce_with_logits(bf(au_logits), au_labels, jnp.ones((2, 5)), bf(np.ones(12)))
  assert bce.dtype == jnp.float32


def test_valid_masks():
  va = jnp.array([[0.1, 0.2], [INVALID_VA, 0.3], [0.4, INVALID_VA], [INVALID_VA, INVALID_VA]])
  np.testing.assert_array_equal(losses.valid_mask_va(va), [1, 0, 0, 0])
  expr = jnp.array([[0, INVALID_EXPR, 7]])
  np.testing.assert_array_equal(losses.valid_mask_expr(expr), [[1, 0, 1]])
  au = np.zeros((3, 12), np.int32)
  au[1, 5] = INVALID_AU
  np.testing.assert_array_equal(losses.valid_mask_au(au), [1, 0, 1])
  for m in (losses.valid_mask_va(va), losses.valid_mask_expr(expr), losses.valid_mask_au(au)):
    assert m.dtype == jnp.float32


def test_losses_jit_and_reject_bad_mask_shape():
  pred, label, mask = _va_batch(np.random.default_rng(8))
  np.testing.assert_allclose(
      jax.jit(losses.ccc_loss)(pred, label, mask), losses.ccc_loss(pred, label, mask), rtol=1e-6)
  with pytest.raises(ValueError, match="mask shape"):
    losses.ccc_loss(pred, label, mask[:, :-1])
