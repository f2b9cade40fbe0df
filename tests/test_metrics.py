"""Metrics against hand-worked numbers, plain float64 loops and sklearn (reference only)."""

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import confusion_matrix, f1_score

from affect_jax import metrics
from affect_jax.data.affwild2 import AU_NAMES, EXPR_NAMES, INVALID_AU, INVALID_EXPR, INVALID_VA

SETTINGS = settings(max_examples=30, deadline=None)


def _loop_ccc(x, y):
  """CCC written out term by term in Python floats; the independent reference."""
  x, y = [float(v) for v in x], [float(v) for v in y]
  n = len(x)
  mx, my = math.fsum(x) / n, math.fsum(y) / n
  vx = math.fsum((a - mx) ** 2 for a in x) / n
  vy = math.fsum((b - my) ** 2 for b in y) / n
  cov = math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / n
  return 2 * cov / (vx + vy + (mx - my) ** 2)


def _sk_f1(*args, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns on ill-defined F1; the value is what we check
    return f1_score(*args, **kwargs)


# ---- CCC ----


def test_ccc_hand_worked():
  # pred mean 2, var 2/3; label mean 7/3, var 14/9; cov 1; bias^2 1/9.
  # CCC = 2 * 1 / (2/3 + 14/9 + 1/9) = 2 / (21/9) = 6/7.
  assert metrics.ccc(np.array([1, 2, 3]), np.array([1, 2, 4])) == pytest.approx(6 / 7, rel=1e-12)


@SETTINGS
@given(
    hnp.arrays(np.float32, st.integers(2, 50), elements=st.floats(-1, 1, width=32)),
    st.floats(-1, 1),
    st.floats(0.1, 2),
    st.integers(0, 2**31 - 1),
)
def test_ccc_matches_loop(pred, shift, scale, seed):
  label = scale * pred + shift + np.random.default_rng(seed).normal(0, 0.3, pred.shape)
  assert metrics.ccc(pred, label) == pytest.approx(_loop_ccc(pred, label), rel=1e-9, abs=1e-12)
  assert metrics.ccc(pred, label) == pytest.approx(metrics.ccc(label, pred), rel=1e-12, abs=1e-15)


def test_ccc_identities():
  x = np.random.default_rng(0).normal(0.3, 0.5, 200)
  var, mu = x.var(), x.mean()
  assert metrics.ccc(x, x) == pytest.approx(1.0)
  # cov(x, -x) = -var, and the means differ by 2mu.
  assert metrics.ccc(x, -x) == pytest.approx(-2 * var / (2 * var + 4 * mu**2))
  assert metrics.ccc(x - mu, mu - x) == pytest.approx(-1.0)
  assert metrics.ccc(np.full_like(x, 0.2), x) == 0.0
  # Unlike Pearson, CCC penalises a bias: a shifted copy is not perfect.
  assert metrics.ccc(x, x + 1) == pytest.approx(2 * var / (2 * var + 1))
  assert metrics.ccc(x, x + 1) < 1


def test_ccc_degenerate_cases_are_finite():
  assert metrics.ccc(np.full(5, 0.3), np.full(5, 0.3)) == 1.0  # documented choice
  assert metrics.ccc(np.full(5, 0.3), np.full(5, -0.2)) == 0.0
  assert metrics.ccc(np.zeros(0), np.zeros(0)) == 0.0
  assert metrics.ccc(np.array([0.5]), np.array([0.1])) == 0.0


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
    metrics.ccc(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 2\)"):
    metrics.va_scores(np.zeros((3, 2)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"\(3,\).*\(5,\)"):
    metrics.expr_f1(np.zeros(3, int), np.zeros(5, int))
  with pytest.raises(ValueError, match=r"\(3, 12\).*\(3, 11\)"):
    metrics.au_f1(np.zeros((3, 12)), np.zeros((3, 11)))


# ---- VA ----


def test_va_scores_drop_invalid_frames():
  rng = np.random.default_rng(1)
  label = rng.uniform(-1, 1, (300, 2))
  pred = 0.7 * label + rng.normal(0, 0.2, label.shape)
  invalid = rng.random(300) < 0.3
  which_dim = rng.integers(0, 2, 300)
  label[invalid, which_dim[invalid]] = INVALID_VA  # one dimension invalid drops the frame

  scores = metrics.va_scores(pred, label)
  keep = ~invalid
  assert scores["valence"] == pytest.approx(_loop_ccc(pred[keep, 0], label[keep, 0]), rel=1e-9)
  assert scores["arousal"] == pytest.approx(_loop_ccc(pred[keep, 1], label[keep, 1]), rel=1e-9)
  assert scores["mean"] == pytest.approx((scores["valence"] + scores["arousal"]) / 2)
  json.dumps(scores)
  assert all(type(v) is float for v in scores.values())

  pred_changed = pred.copy()
  pred_changed[invalid] = rng.normal(0, 10, (invalid.sum(), 2))
  assert metrics.va_scores(pred_changed, label) == scores


def test_va_scores_all_invalid_is_zero():
  scores = metrics.va_scores(np.zeros((4, 2)), np.full((4, 2), INVALID_VA))
  assert scores == {"valence": 0.0, "arousal": 0.0, "mean": 0.0}


# ---- Expressions ----


def _random_expr(rng, n, present, p_invalid):
  label = rng.choice(present, n)
  pred = np.where(rng.random(n) < 0.6, label, rng.choice(present, n))
  label[rng.random(n) < p_invalid] = INVALID_EXPR
  return pred, label


@pytest.mark.parametrize("seed", range(20))
def test_expr_f1_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  # Some classes absent from both pred and label, as in short validation videos.
  present = rng.choice(8, rng.integers(1, 9), replace=False)
  pred, label = _random_expr(rng, int(rng.integers(1, 400)), present, p_invalid=0.2)
  keep = label != INVALID_EXPR
  if not keep.any():
    pytest.skip("all frames invalid; covered by test_expr_f1_all_invalid")
  ref = _sk_f1(label[keep], pred[keep], average="macro", labels=range(8), zero_division=0)
  assert metrics.expr_f1(pred, label) == pytest.approx(ref, rel=1e-12)
  # sklearn's default zero_division ("warn") scores ill-defined classes 0 too.
  assert metrics.expr_f1(pred, label) == pytest.approx(
      _sk_f1(label[keep], pred[keep], average="macro", labels=range(8)), rel=1e-12)
  per_class = _sk_f1(label[keep], pred[keep], average=None, labels=range(8), zero_division=0)
  scores = metrics.expr_scores(pred, label)
  assert list(scores["per_class"]) == list(EXPR_NAMES)
  np.testing.assert_allclose(list(scores["per_class"].values()), per_class, rtol=1e-12)
  np.testing.assert_array_equal(
      metrics.expr_confusion(pred, label),
      confusion_matrix(label[keep], pred[keep], labels=range(8)))


def test_expr_f1_edge_cases():
  # One class only, predicted perfectly: that class scores 1, the other 7 score 0.
  assert metrics.expr_f1(np.full(10, 4), np.full(10, 4)) == pytest.approx(1 / 8)
  # Predictions only of a class absent from the labels.
  ref = _sk_f1(np.full(10, 4), np.full(10, 2), average="macro", labels=range(8), zero_division=0)
  assert metrics.expr_f1(np.full(10, 2), np.full(10, 4)) == ref == 0.0
  assert metrics.expr_f1(np.arange(8), np.arange(8)) == 1.0


def test_expr_f1_all_invalid_is_zero():
  assert metrics.expr_f1(np.arange(5), np.full(5, INVALID_EXPR)) == 0.0
  assert metrics.expr_f1(np.zeros(0, int), np.zeros(0, int)) == 0.0


def test_expr_invalid_frames_do_not_matter():
  rng = np.random.default_rng(3)
  pred, label = _random_expr(rng, 200, np.arange(8), p_invalid=0.3)
  changed = pred.copy()
  changed[label == INVALID_EXPR] = rng.integers(0, 8, (label == INVALID_EXPR).sum())
  assert metrics.expr_scores(changed, label) == metrics.expr_scores(pred, label)


def test_expr_out_of_range_raises():
  with pytest.raises(ValueError, match="pred"):
    metrics.expr_f1(np.array([0, 8]), np.array([0, 1]))
  with pytest.raises(ValueError, match="label"):
    metrics.expr_f1(np.array([0, 1]), np.array([0, -2]))


# ---- Action units ----


def _random_au(rng, n, p_invalid=0.1):
  rate = rng.uniform(0, 0.5, 12)
  rate[rng.integers(0, 12)] = 0.0  # a unit never active, as for rare AUs in a short video
  label = (rng.random((n, 12)) < rate).astype(np.int64)
  flip = rng.random((n, 12)) < 0.2
  pred = np.where(flip, 1 - label, label)
  invalid_rows = rng.random(n) < p_invalid
  label[invalid_rows, rng.integers(0, 12, invalid_rows.sum())] = INVALID_AU
  return pred, label, invalid_rows


@pytest.mark.parametrize("seed", range(15))
def test_au_f1_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  pred, label, invalid = _random_au(rng, int(rng.integers(1, 300)))
  scores = metrics.au_f1(pred, label)
  keep = ~invalid
  ref = [
      _sk_f1(label[keep, k], pred[keep, k], zero_division=0) if keep.any() else 0.0
      for k in range(12)
  ]
  assert list(scores["per_au"]) == list(AU_NAMES)
  np.testing.assert_allclose(list(scores["per_au"].values()), ref, rtol=1e-12)
  assert scores["f1"] == pytest.approx(np.mean(ref), rel=1e-12)
  json.dumps(scores)


def test_au_f1_invalid_rows_and_edge_cases():
  rng = np.random.default_rng(7)
  pred, label, invalid = _random_au(rng, 200, p_invalid=0.3)
  changed = pred.copy()
  changed[invalid] = 1 - changed[invalid]
  assert metrics.au_f1(changed, label) == metrics.au_f1(pred, label)

  all_invalid = metrics.au_f1(pred, np.full_like(label, INVALID_AU))
  assert all_invalid["f1"] == 0.0 and set(all_invalid["per_au"].values()) == {0.0}
  # No positives anywhere: sklearn's zero_division=0 gives 0, not 1.
  assert metrics.au_f1(np.zeros((5, 12)), np.zeros((5, 12)))["f1"] == 0.0
  with pytest.raises(ValueError, match="0/1"):
    metrics.au_f1(np.full((5, 12), 0.7), np.zeros((5, 12)))


def test_au_f1_from_probs_thresholds():
  rng = np.random.default_rng(4)
  prob = rng.random((100, 12))
  _, label, _ = _random_au(rng, 100)
  assert metrics.au_f1_from_probs(prob, label) == metrics.au_f1((prob >= 0.5).astype(int), label)
  t = np.linspace(0.2, 0.8, 12)
  assert metrics.au_f1_from_probs(prob, label, t) == metrics.au_f1((prob >= t).astype(int), label)
  with pytest.raises(ValueError, match="threshold"):
    metrics.au_f1_from_probs(prob, label, np.ones(3))


def test_tune_au_thresholds_finds_planted_threshold():
  grid = metrics.AU_THRESHOLD_GRID
  rng = np.random.default_rng(5)
  # Dense probabilities put samples in every grid interval, so only the planted
  # threshold reaches F1 = 1.
  prob = rng.random((3000, 12))
  planted = grid[rng.integers(0, len(grid), 12)]
  label = (prob >= planted).astype(np.int64)
  label[::7, 3] = INVALID_AU  # invalid rows are ignored by the tuning
  np.testing.assert_array_equal(metrics.tune_au_thresholds(prob, label), planted)
  assert metrics.au_f1_from_probs(prob, label, planted)["f1"] == 1.0


def test_tune_au_thresholds_ties_go_to_half():
  prob = np.random.default_rng(6).random((50, 12))
  # No positive label: every threshold scores 0, so all keep the default.
  np.testing.assert_allclose(metrics.tune_au_thresholds(prob, np.zeros((50, 12))), 0.5)
  # Nothing valid at all behaves the same.
  np.testing.assert_allclose(metrics.tune_au_thresholds(prob, np.full((50, 12), INVALID_AU)), 0.5)


@pytest.mark.parametrize("seed", range(3))
def test_tune_au_thresholds_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  grid = np.linspace(0.1, 0.9, 9)
  # Probabilities on the grid itself test the prob >= threshold boundary.
  prob = np.where(rng.random((150, 12)) < 0.5, rng.choice(grid, (150, 12)), rng.random((150, 12)))
  _, label, invalid = _random_au(rng, 150)
  keep = ~invalid
  expected = []
  for k in range(12):
    f1 = np.array([
        _sk_f1(label[keep, k], (prob[keep, k] >= g).astype(int), zero_division=0)
        for g in grid
    ])
    best = [g for g, f in zip(grid, f1) if np.isclose(f, f1.max(), rtol=1e-12, atol=0)]
    expected.append(min(best, key=lambda g: (round(abs(g - 0.5), 9), g)))
  np.testing.assert_allclose(metrics.tune_au_thresholds(prob, label, grid), expected)


# ---- Video bootstrap ----


def test_video_bootstrap_of_a_mean_matches_the_normal_interval():
  # Videos of equal length whose frames all equal the video's value: the whole-split
  # mean is the mean of V video values, so resampling videos gives the plug-in standard
  # error std(values) / sqrt(V) and, for large V, the normal 90% interval.
  rng = np.random.default_rng(0)
  values = rng.normal(2.0, 1.5, 60)
  preds = [np.full(7, v) for v in values]
  labels = [np.zeros(7) for _ in values]
  low, high = metrics.video_bootstrap(lambda p, l: float(p.mean()), preds, labels,
                                      num_samples=4000, seed=1)
  se = values.std() / np.sqrt(len(values))
  np.testing.assert_allclose([low, high], values.mean() + np.array([-1.645, 1.645]) * se,
                             atol=0.12 * se)


def test_video_bootstrap_units_are_videos_not_frames():
  # Identical videos: every draw is the same split, so the interval is the point score,
  # however noisy the frames inside a video are.
  rng = np.random.default_rng(2)
  pred, label = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
  score = lambda p, l: metrics.va_scores(p, l)["mean"]  # noqa: E731
  low, high = metrics.video_bootstrap(score, [pred] * 5, [label] * 5, num_samples=50)
  np.testing.assert_allclose([low, high], score(pred, label), rtol=1e-12)


def test_video_bootstrap_is_seeded_and_checks_its_arguments():
  rng = np.random.default_rng(3)
  preds = [rng.integers(0, 8, n) for n in (5, 9, 13, 4)]
  labels = [rng.integers(0, 8, n) for n in (5, 9, 13, 4)]
  a = metrics.video_bootstrap(metrics.expr_f1, preds, labels, num_samples=100, seed=4)
  assert a == metrics.video_bootstrap(metrics.expr_f1, preds, labels, num_samples=100, seed=4)
  assert a[0] <= metrics.expr_f1(np.concatenate(preds), np.concatenate(labels)) <= a[1]
  with pytest.raises(ValueError, match="parallel non-empty"):
    metrics.video_bootstrap(metrics.expr_f1, preds, labels[:2])
  with pytest.raises(ValueError, match="level"):
    metrics.video_bootstrap(metrics.expr_f1, preds, labels, level=90)


def test_main_score_is_each_tasks_headline_metric():
  rng = np.random.default_rng(5)
  va_p, va_l = rng.uniform(-1, 1, (30, 2)), rng.uniform(-1, 1, (30, 2))
  ex_p, ex_l = rng.integers(0, 8, 30), rng.integers(0, 8, 30)
  au_p, au_l = rng.integers(0, 2, (30, 12)), rng.integers(0, 2, (30, 12))
  assert metrics.main_score("VA", va_p, va_l) == metrics.va_scores(va_p, va_l)["mean"]
  assert metrics.main_score("EXPR", ex_p, ex_l) == metrics.expr_f1(ex_p, ex_l)
  assert metrics.main_score("AU", au_p, au_l) == metrics.au_f1(au_p, au_l)["f1"]
  assert metrics.task_scores("VA", va_p, va_l) == metrics.va_scores(va_p, va_l)
  assert metrics.task_scores("AU", au_p, au_l) == metrics.au_f1(au_p, au_l)
  with pytest.raises(ValueError, match="task"):
    metrics.main_score("VAD", va_p, va_l)
  # The reported interval: the headline score's video bootstrap at INTERVAL_LEVEL = 0.9.
  cuts = [7, 15, 22]
  got = metrics.score_interval("EXPR", np.split(ex_p, cuts), np.split(ex_l, cuts), num_samples=200)
  assert got == list(metrics.video_bootstrap(metrics.expr_f1, np.split(ex_p, cuts),
                                             np.split(ex_l, cuts), num_samples=200, level=0.9))
  # ... and the record a run writes under 'intervals' carries it with what it measured.
  record = metrics.interval_record("EXPR", {"val": (np.split(ex_p, cuts), np.split(ex_l, cuts))},
                                   num_samples=200)
  assert record == {"metric": "f1", "level": 0.9, "samples": 200, "val": got}


def test_paired_video_bootstrap_of_a_difference():
  # Model b = model a plus a constant 0.1 on every frame: the difference of their means is
  # 0.1 in every draw, whatever the videos drawn (a pairing check: unpaired resampling of
  # the two would scatter it).
  rng = np.random.default_rng(6)
  a = [rng.normal(size=n) for n in (4, 8, 3, 9, 5)]
  b = [x + 0.1 for x in a]
  labels = [np.zeros(len(x)) for x in a]
  diffs = metrics.video_bootstrap_draws(lambda p, q, l: float(q.mean() - p.mean()), a, b, labels,
                                        num_samples=200)
  np.testing.assert_allclose(diffs, 0.1, atol=1e-12)
