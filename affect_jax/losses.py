"""Masked training losses (DESIGN.md "Losses and metrics").

Every loss takes a per-frame `mask` ([B, T] or [N], bool or float, > 0 = valid). Invalid
and padded frames are removed with `jnp.where` (never multiplied by 0), so NaN/inf or the
-5/-1 markers there change neither the value nor the gradient. A batch with no valid frame
gives loss 0.0 and zero gradients, so a task missing from a batch adds nothing.

Losses compute in float32 (bfloat16/float16 inputs are upcast); float64 inputs stay float64
so gradient checks can run under `jax.enable_x64`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from affect_jax.tasks import INVALID_AU, INVALID_EXPR, INVALID_VA


def _upcast(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_mask(mask: jax.Array, shape: tuple[int, ...], what: str) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape != shape:
    raise ValueError(f"mask shape {mask.shape} != {what} frame shape {shape}")
  return mask > 0


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, 0 where count == 0; the inner where keeps the gradient finite."""
  safe_count = jnp.where(count > 0, count, 1)
  return jnp.where(count > 0, total / safe_count, 0)


# ---- Validity masks from the ABAW markers ----


def valid_mask_va(label: jax.Array) -> jax.Array:
  """[..., 2] VA labels -> [...] float32, 0 where either dimension is INVALID_VA."""
  return jnp.all(jnp.asarray(label) != INVALID_VA, axis=-1).astype(jnp.float32)


def valid_mask_expr(label: jax.Array) -> jax.Array:
  """[...] Expr labels -> [...] float32, 0 where the label is INVALID_EXPR."""
  return (jnp.asarray(label) != INVALID_EXPR).astype(jnp.float32)


def valid_mask_au(label: jax.Array) -> jax.Array:
  """[..., 12] AU labels -> [...] float32, 0 where any unit is INVALID_AU."""
  return jnp.all(jnp.asarray(label) != INVALID_AU, axis=-1).astype(jnp.float32)


# ---- Valence / arousal ----


def ccc_loss(pred: jax.Array, label: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """1 - CCC per dimension, averaged over valence and arousal; scalar.

  pred, label: [..., 2]; mask: [...]. CCC pools all valid frames of the batch (population
  moments), as the VA metric pools a whole video. `eps` keeps the denominator positive when
  both series are constant. Frames labelled INVALID_VA are dropped even if mask says valid.
  """
  pred, label = _upcast(pred), _upcast(label)
  if pred.shape != label.shape or pred.shape[-1] != 2:
    raise ValueError(
        f"expected pred and label of shape [..., 2], got {pred.shape} and {label.shape}")
  valid = _check_mask(mask, pred.shape[:-1], "pred") & (valid_mask_va(label) > 0)
  valid = valid.reshape(-1, 1)
  # Zero invalid frames up front so a NaN/inf there never enters the arithmetic.
  pred = jnp.where(valid, pred.reshape(-1, 2), 0)
  label = jnp.where(valid, label.reshape(-1, 2), 0)
  count = valid.sum(dtype=pred.dtype)

  def masked_mean(x):  # [N, 2] -> [2]
    return _safe_mean(jnp.where(valid, x, 0).sum(axis=0), count)

  mu_p, mu_l = masked_mean(pred), masked_mean(label)
  # Centre before squaring: E[x^2] - E[x]^2 cancels badly in float32.
  dp = jnp.where(valid, pred - mu_p, 0)
  dl = jnp.where(valid, label - mu_l, 0)
  cov = masked_mean(dp * dl)
  denom = masked_mean(dp * dp) + masked_mean(dl * dl) + (mu_p - mu_l) ** 2 + eps
  ccc = 2 * cov / denom
  return jnp.where(count > 0, 1 - ccc.mean(), 0)


# ---- Expressions ----


def masked_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    class_weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """Softmax cross-entropy averaged over valid frames; scalar.

  logits: [..., C]; labels: [...] int (may be -1 where invalid); mask: [...]. Matches
  PyTorch's `CrossEntropyLoss(weight=class_weights, label_smoothing=..., reduction='mean')`:
  frame n contributes sum_c w_c * y_nc * -log p_nc with smoothed targets
  y = (1 - s) * onehot + s / C, and the sum is divided by sum_n w_{label_n}.
  Labels outside [0, C) count as invalid.
  """
  logits = _upcast(logits)
  labels = jnp.asarray(labels)
  num_classes = logits.shape[-1]
  if labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels shape {labels.shape} != logits frame shape {logits.shape[:-1]}")
  valid = _check_mask(mask, labels.shape, "labels") & (labels >= 0) & (labels < num_classes)
  # Invalid frames get class 0 and logits 0 so indexing stays in bounds and a NaN there
  # cannot reach the backward pass (0 * NaN); `valid` removes them from the sums below.
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  logits = jnp.where(valid[..., None], logits, 0)
  if class_weights is None:
    weights = jnp.ones((num_classes,), logits.dtype)
  else:
    weights = jnp.asarray(class_weights, logits.dtype)
    if weights.shape != (num_classes,):
      raise ValueError(f"class_weights shape {weights.shape} != ({num_classes},)")
  if class_weights is None and label_smoothing == 0.0:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  else:
    one_hot = jax.nn.one_hot(safe_labels, num_classes, dtype=logits.dtype)
    targets = optax.smooth_labels(one_hot, label_smoothing)
    # Weighted targets give PyTorch's per-frame sum_c w_c * y_c * -log p_c directly.
    ce = optax.softmax_cross_entropy(logits, targets * weights)
  frame_weight = jnp.where(valid, weights[safe_labels], 0)
  return _safe_mean(jnp.where(valid, ce, 0).sum(), frame_weight.sum())


# ---- Action units ----


def masked_bce_with_logits(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    pos_weight: jax.Array | None = None,
) -> jax.Array:
  """Sigmoid BCE averaged over valid frames and the K units; scalar.

  logits, labels: [..., K] (labels 0/1, or -1 where invalid); mask: [...] per frame;
  pos_weight: [K]. Per element this is PyTorch's `BCEWithLogitsLoss(pos_weight=...)`:
  -(pos_weight * y * log sigmoid(x) + (1 - y) * log sigmoid(-x)). Elements labelled
  INVALID_AU are dropped even in a frame the mask calls valid.
  """
  logits = _upcast(logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape:
    raise ValueError(f"labels shape {labels.shape} != logits shape {logits.shape}")
  valid = _check_mask(mask, logits.shape[:-1], "logits")[..., None] & (labels != INVALID_AU)
  # As in masked_cross_entropy: sanitise invalid elements so their gradient is exactly 0.
  targets = jnp.where(valid, labels, 0).astype(logits.dtype)
  logits = jnp.where(valid, logits, 0)
  loss = optax.sigmoid_binary_cross_entropy(logits, targets)
  if pos_weight is not None:
    pos_weight = jnp.asarray(pos_weight, logits.dtype)
    if pos_weight.shape != (logits.shape[-1],):
      raise ValueError(f"pos_weight shape {pos_weight.shape} != ({logits.shape[-1]},)")
    # optax's loss already holds 1x the positive term -y*log(sigmoid(x)); add the rest.
    loss = loss + (pos_weight - 1) * targets * -jax.nn.log_sigmoid(logits)
  count = valid.sum(dtype=logits.dtype)
  return _safe_mean(jnp.where(valid, loss, 0).sum(), count)
