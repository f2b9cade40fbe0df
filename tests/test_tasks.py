"""The task records: the ABAW formats by hand, their decisions and activations against numpy,
and a new task that is only a record going through the data layer, metrics and losses."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from affect_jax import metrics, tasks
from affect_jax.data import affwild2
from affect_jax.train import temporal


def test_the_abaw_formats_by_hand():
  va, expr, au = tasks.VA, tasks.EXPR, tasks.AU
  assert (va.out_dim, expr.out_dim, au.out_dim) == (2, 8, 12)
  assert (va.label_width, expr.label_width, au.label_width) == (2, 1, 12)
  assert (va.label_shape, expr.label_shape, au.label_shape) == ((2,), (), (12,))
  assert va.header == "valence,arousal" and au.header.startswith("AU1,AU2,AU4,")
  assert expr.test_list == "EXPR_Recognition_Challenge_test_set.txt"
  assert va.format_label([0.25, -5.0]) == "-5,-5" and va.format_label([0.25, -1]) == "0.250,-1.000"
  assert expr.format_label([3]) == "3" and au.format_label([1, 0] * 6) == ",".join(["1,0"] * 6)
  assert va.format_prediction([0.123456, 1]) == "0.1235,1.0000"
  np.testing.assert_array_equal(va.bad_rows(np.array([[0, 1], [1.01, 0], [-5, -5], [-5, 0.5]])),
                                [1])
  np.testing.assert_array_equal(expr.bad_rows(np.array([[7.0], [8.0], [-1.0], [2.5], [-2.0]])),
                                [1, 3, 4])
  np.testing.assert_array_equal(au.bad_rows(np.array([[0.0] * 12, [2.0] + [0.0] * 11])), [1])
  assert va.range_rule == "values must be in [-1, 1] or -5 (invalid)"
  assert expr.range_rule == "value must be an integer in -1..7"
  np.testing.assert_array_equal(va.valid(np.array([[0, 0], [-5, 0.3]])), [True, False])
  np.testing.assert_array_equal(expr.valid(np.array([0, -1, 7])), [True, False, True])
  assert expr.invalid_labels(3).dtype == np.int32 and (expr.invalid_labels(3) == -1).all()
  with pytest.raises(ValueError, match="unknown task 'VAD'; expected one of"):
    tasks.get("VAD")


def test_decisions_and_activations_against_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 12)).astype(np.float32)
  np.testing.assert_array_equal(tasks.VA.decide(3 * x[:, :2]), np.clip(3 * x[:, :2], -1, 1))
  np.testing.assert_array_equal(tasks.EXPR.decide(x[:, :8]), x[:, :8].argmax(-1))
  thr = np.linspace(0.1, 0.9, 12)
  np.testing.assert_array_equal(tasks.AU.decide(x, thr), (x >= thr).astype(np.int32))
  e = np.exp(x[:, :8] - x[:, :8].max(-1, keepdims=True))
  np.testing.assert_allclose(tasks.EXPR.activate(jnp.asarray(x[:, :8])), e / e.sum(-1, keepdims=True),
                             rtol=1e-6)
  np.testing.assert_allclose(tasks.AU.activate(jnp.asarray(x)), 1 / (1 + np.exp(-x)), rtol=1e-6)
  np.testing.assert_array_equal(tasks.VA.activate(x), x)


def test_a_new_task_is_one_record(tmp_path, monkeypatch):
  """A 3-unit multilabel task nobody wrote code for: its annotation files, submissions,
  metrics and loss work from the record alone."""
  toy = dataclasses.replace(tasks.AU, name="TOY", dirs=("Toy_Challenge",), columns=("a", "b", "c"))
  monkeypatch.setitem(tasks.REGISTRY, "TOY", toy)
  labels = np.array([[1, 0, 1], [-1, -1, -1], [0, 0, 1]], np.int32)
  affwild2.write_annotation(tmp_path / "v.txt", "TOY", labels)
  assert (tmp_path / "v.txt").read_text() == "a,b,c\n1,0,1\n-1,-1,-1\n0,0,1\n"
  np.testing.assert_array_equal(affwild2.parse_annotation(tmp_path / "v.txt", "TOY"), labels)
  (tmp_path / "w.txt").write_text("a,b,c\n1,0,2\n")
  with pytest.raises(affwild2.AnnotationError, match=r"w.txt:2: values must be 0, 1 or -1"):
    affwild2.parse_annotation(tmp_path / "w.txt", "TOY")
  probs = np.array([[0.9, 0.2, 0.6], [0.5, 0.5, 0.5], [0.1, 0.4, 0.7]])
  decided = temporal.decide("TOY", probs)
  np.testing.assert_array_equal(decided, [[1, 0, 1], [1, 1, 1], [0, 0, 1]])
  affwild2.write_predictions(tmp_path / "p.csv", "TOY", {"vid": decided})
  np.testing.assert_array_equal(affwild2.parse_predictions(tmp_path / "p.csv", "TOY")["vid"], decided)
  # Its metric is its kind's: the mean F1 over units of the valid frames (frames 1 and 3).
  scores = metrics.task_scores("TOY", decided, labels)
  assert scores["f1"] == pytest.approx(np.mean([1.0, 0.0, 1.0]))
  loss = temporal.task_loss("TOY", jnp.zeros((3, 3)), jnp.asarray(np.maximum(labels, 0)),
                            jnp.asarray(toy.valid(labels), jnp.float32))
  np.testing.assert_allclose(loss, np.log(2), rtol=1e-6)
