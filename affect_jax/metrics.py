"""ABAW evaluation metrics on whole videos (numpy only; DESIGN.md "Losses and metrics").

Every score is a plain Python float so results can go straight into JSON. Frames with an
invalid label (VA -5 in either dimension, Expr -1, AU -1 in any unit) are dropped before
scoring, as ABAW's official scripts do. A score over zero frames is 0.0, never NaN.

F1 follows sklearn's `f1_score(..., zero_division=0)` (sklearn is a test reference only):
a class with no true and no predicted frame scores 0 and still counts in the macro mean
over the 8 expressions, like ABAW's `f1_score(average='macro', labels=range(8))`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from affect_jax import tasks
from affect_jax.tasks import AU_NAMES, EXPR_NAMES, INVALID_AU, INVALID_EXPR, INVALID_VA, VA_NAMES

NUM_EXPR = len(EXPR_NAMES)
NUM_AU = len(AU_NAMES)
# The key of each task's headline score: VA mean CCC, Expr macro-F1, AU mean F1.
MAIN_METRIC = {t.name: t.main_metric for t in tasks.REGISTRY.values()}
INTERVAL_LEVEL = 0.9  # coverage of the reported video-bootstrap intervals
AU_THRESHOLD_GRID = np.linspace(0.05, 0.95, 19)


def _check_same_shape(pred: np.ndarray, label: np.ndarray, trailing: int | None = None) -> None:
  if pred.shape != label.shape:
    raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
  if trailing is not None and (pred.ndim != 2 or pred.shape[1] != trailing):
    raise ValueError(
        f"expected pred and label of shape [N, {trailing}], got {pred.shape} and {label.shape}")


def _f1_from_counts(tp: np.ndarray, pred_pos: np.ndarray, true_pos: np.ndarray) -> np.ndarray:
  """F1 = 2tp / (2tp + fp + fn) = 2tp / (pred_pos + true_pos); 0 where that is 0/0."""
  denom = pred_pos + true_pos
  return np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 0.0)


# ---- Valence / arousal ----


def ccc(pred: np.ndarray, label: np.ndarray) -> float:
  """Lin's concordance correlation coefficient of two [N] series, population moments.

  Degenerate cases: zero frames -> 0.0; both series constant and equal (the only way the
  denominator is 0) -> 1.0, since prediction and label agree exactly. Both constant but
  different falls out of the formula as 0.0.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  _check_same_shape(pred, label)
  p = pred.astype(np.float64).ravel()
  l = label.astype(np.float64).ravel()
  if p.size == 0:
    return 0.0
  mu_p, mu_l = p.mean(), l.mean()
  # Centre first: E[x^2] - E[x]^2 loses precision when the mean dominates the spread.
  dp, dl = p - mu_p, l - mu_l
  cov = np.mean(dp * dl)
  denom = np.mean(dp * dp) + np.mean(dl * dl) + (mu_p - mu_l) ** 2
  if denom == 0.0:
    return 1.0
  return float(2.0 * cov / denom)


def va_scores(pred: np.ndarray, label: np.ndarray, names: Sequence[str] = VA_NAMES,
              invalid: float = INVALID_VA) -> dict[str, float]:
  """CCC of valence, arousal and their mean (ABAW's VA score) for [N, 2] arrays (of each
  of `names` and their mean for [N, len(names)]).

  A frame whose label is INVALID_VA in either dimension is dropped from both.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  _check_same_shape(pred, label, trailing=len(names))
  valid = np.all(label != invalid, axis=-1)
  scores = {name: ccc(pred[valid, i], label[valid, i]) for i, name in enumerate(names)}
  scores["mean"] = float(np.mean([scores[name] for name in names]))
  return scores


# ---- Expressions ----


def expr_confusion(pred: np.ndarray, label: np.ndarray, num_classes: int = NUM_EXPR) -> np.ndarray:
  """[8, 8] int64 confusion matrix, rows = label, columns = prediction.

  Frames labelled INVALID_EXPR are dropped. Other values outside [0, 8) raise ValueError,
  since silently dropping them would change the per-class counts.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  _check_same_shape(pred, label)
  pred, label = pred.ravel(), label.ravel()
  valid = label != INVALID_EXPR
  pred, label = pred[valid].astype(np.int64), label[valid].astype(np.int64)
  n = int(num_classes)
  for name, x in (("pred", pred), ("label", label)):
    if x.size and (x.min() < 0 or x.max() >= n):
      raise ValueError(f"{name} has values outside [0, {n}): {np.unique(x)}")
  return np.bincount(label * n + pred, minlength=n * n).reshape(n, n)


def expr_scores(pred: np.ndarray, label: np.ndarray, names: Sequence[str] = EXPR_NAMES) -> dict:
  """{"per_class": {name: F1}, "f1": macro F1 over all 8 classes} for [N] class indices
  (over every one of `names`)."""
  confusion = expr_confusion(pred, label, len(names))
  per_class = _f1_from_counts(np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1))
  return {
      "per_class": {name: float(f) for name, f in zip(names, per_class)},
      "f1": float(per_class.mean()),
  }


def expr_f1(pred: np.ndarray, label: np.ndarray, names: Sequence[str] = EXPR_NAMES) -> float:
  """ABAW's Expr score: macro F1 over the 8 classes (absent classes count as 0)."""
  return expr_scores(pred, label, names)["f1"]


# ---- Action units ----


def _valid_au_rows(label: np.ndarray) -> np.ndarray:
  return ~np.any(label == INVALID_AU, axis=-1)


def au_f1(pred: np.ndarray, label: np.ndarray, names: Sequence[str] = AU_NAMES) -> dict:
  """{"f1": mean over the 12 units, "per_au": {AU name: F1}} for [N, 12] 0/1 arrays (over
  `names` for [N, len(names)]).

  Rows with INVALID_AU in any unit are dropped. A unit with no positive label and no
  positive prediction scores 0.
  """
  pred, label = np.asarray(pred), np.asarray(label)
  _check_same_shape(pred, label, trailing=len(names))
  if not np.all((pred == 0) | (pred == 1)):
    raise ValueError("pred must be 0/1; use au_f1_from_probs for probabilities")
  valid = _valid_au_rows(label)
  p = pred[valid] == 1
  l = label[valid] == 1
  per_au = _f1_from_counts(np.sum(p & l, axis=0), p.sum(axis=0), l.sum(axis=0))
  return {
      "f1": float(per_au.mean()),
      "per_au": {name: float(f) for name, f in zip(names, per_au)},
  }


def _thresholds(threshold: float | np.ndarray) -> np.ndarray:
  t = np.asarray(threshold, dtype=np.float64)
  if t.shape not in ((), (NUM_AU,)):
    raise ValueError(f"threshold must be a scalar or of shape ({NUM_AU},), got {t.shape}")
  return np.broadcast_to(t, (NUM_AU,))


def au_f1_from_probs(
    prob: np.ndarray, label: np.ndarray, threshold: float | np.ndarray = 0.5) -> dict:
  """`au_f1` of [N, 12] probabilities binarised as prob >= threshold (scalar or [12])."""
  prob, label = np.asarray(prob), np.asarray(label)
  _check_same_shape(prob, label, trailing=NUM_AU)
  return au_f1((prob >= _thresholds(threshold)).astype(np.int64), label)


def tune_au_thresholds(
    prob: np.ndarray, label: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
  """Per-unit threshold from `grid` maximising that unit's F1 on (prob, label); [12].

  Ties go to the threshold closest to 0.5 (then the lower one), so units the data cannot
  decide keep the default. Uses the same prob >= threshold rule as `au_f1_from_probs`.
  """
  prob, label = np.asarray(prob), np.asarray(label)
  _check_same_shape(prob, label, trailing=NUM_AU)
  grid = AU_THRESHOLD_GRID if grid is None else np.asarray(grid, dtype=np.float64).ravel()
  valid = _valid_au_rows(label)
  prob, positive = prob[valid].astype(np.float64), label[valid] == 1
  # Rounded so grid points equally far from 0.5 (up to float error) tie exactly.
  closeness = np.round(np.abs(grid - 0.5), 9)
  thresholds = np.empty(NUM_AU)
  for k in range(NUM_AU):
    # Counts of prob >= t for every t at once: sorted probs + searchsorted, O(N log N).
    all_sorted = np.sort(prob[:, k])
    pos_sorted = np.sort(prob[positive[:, k], k])
    pred_pos = all_sorted.size - np.searchsorted(all_sorted, grid, side="left")
    tp = pos_sorted.size - np.searchsorted(pos_sorted, grid, side="left")
    f1 = _f1_from_counts(tp, pred_pos, pos_sorted.size)
    # lexsort: last key is primary. Highest F1, then closest to 0.5, then lowest threshold.
    best = np.lexsort((grid, closeness, -f1))[0]
    thresholds[k] = grid[best]
  return thresholds


# ---- Uncertainty over videos ----


def task_scores(task: str, pred: np.ndarray, label: np.ndarray) -> dict:
  """The task's scores of decided predictions (VA values, Expr class indices, AU 0/1):
  `va_scores`, {'f1': `expr_f1`} or `au_f1`."""
  spec = tasks.get(task)
  if spec.kind == tasks.REGRESSION:
    return va_scores(pred, label, spec.columns, spec.invalid)
  if spec.kind == tasks.MULTICLASS:
    return {"f1": expr_f1(pred, label, spec.columns)}
  return au_f1(pred, label, spec.columns)


def main_score(task: str, pred: np.ndarray, label: np.ndarray) -> float:
  """The task's headline score (`MAIN_METRIC`) of decided predictions."""
  return task_scores(task, pred, label)[MAIN_METRIC[task]]


def video_bootstrap_draws(score_fn: Callable[..., float], *per_video: Sequence[np.ndarray],
                          num_samples: int = 1000, seed: int = 0) -> np.ndarray:
  """[num_samples] scores of a whole split whose videos are resampled with replacement.

  Frames of one video are strongly correlated, so the unit of resampling is the video:
  `per_video` are parallel lists with one array per video (predictions, labels, or the
  predictions of a second model for a paired comparison); each draw takes as many videos
  as there are, with replacement, concatenates every list over the drawn videos and calls
  `score_fn(*concatenated)`. The draws depend only on the seed and the number of videos, so
  models scored on the same videos in the same order are resampled alike.
  """
  counts = {len(x) for x in per_video}
  if len(counts) != 1 or 0 in counts or not per_video:
    raise ValueError(f"need parallel non-empty per-video lists, got lengths "
                     f"{[len(x) for x in per_video]}")
  n = counts.pop()
  draws = np.random.default_rng(seed).integers(0, n, (num_samples, n))
  return np.array([score_fn(*(np.concatenate([x[i] for i in d]) for x in per_video))
                   for d in draws], np.float64)


def percentile_interval(draws: np.ndarray, level: float = INTERVAL_LEVEL) -> tuple[float, float]:
  """The (1 - level) / 2 and (1 + level) / 2 quantiles of bootstrap draws."""
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  low, high = np.quantile(draws, [(1.0 - level) / 2, (1.0 + level) / 2])
  return float(low), float(high)


def video_bootstrap(score_fn: Callable[..., float], *per_video: Sequence[np.ndarray],
                    num_samples: int = 1000, level: float = INTERVAL_LEVEL,
                    seed: int = 0) -> tuple[float, float]:
  """`percentile_interval` of `video_bootstrap_draws`, e.g.
  `video_bootstrap(metrics.expr_f1, preds, labels)`."""
  return percentile_interval(
      video_bootstrap_draws(score_fn, *per_video, num_samples=num_samples, seed=seed), level)


def score_interval(task: str, preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], *,
                   num_samples: int = 1000) -> list[float]:
  """[low, high]: the `INTERVAL_LEVEL` `video_bootstrap` interval of the task's headline
  score, from one array of decided predictions and one of labels per video."""
  return list(video_bootstrap(lambda p, l: main_score(task, p, l), preds, labels,
                              num_samples=num_samples, level=INTERVAL_LEVEL))


def interval_record(task: str, per_split: Mapping[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
                    num_samples: int) -> dict:
  """What a run reports under 'intervals': {'metric', 'level', 'samples'} and, for each key
  of `per_split` ({key: (decided predictions per video, labels per video)}), its
  `score_interval`."""
  return {"metric": MAIN_METRIC[task], "level": INTERVAL_LEVEL, "samples": num_samples,
          **{key: score_interval(task, preds, labels, num_samples=num_samples)
             for key, (preds, labels) in per_split.items()}}
