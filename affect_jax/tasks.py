"""The ABAW tasks as data: one frozen record per task holds everything that makes it special.

  task = tasks.get("AU")
  task.columns        the header of its annotation and prediction files (and its outputs)
  task.dirs           its annotation folders in an Aff-Wild2 tree (the first is the one written)
  task.kind           'regression' (values in a range), 'multiclass' (one class index per
                      frame) or 'multilabel' (0/1 per unit): what its loss, activation,
                      decision and metric are
  task.invalid        the marker of a frame without a label
  task.main_metric    the key of its headline score in `metrics.task_scores`, and
  task.score_name     what tables call it (CCC, F1)
  task.valid(labels), task.invalid_labels(n), task.decide(outputs), task.activate(logits),
  task.labels_from(values), task.bad_rows(values), task.format_label(row), ...

Code that runs a task reads its record (and, for the loss and the metric, its kind), so a new
task of a known kind is one more record here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

REGRESSION, MULTICLASS, MULTILABEL = "regression", "multiclass", "multilabel"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  dirs: tuple[str, ...]
  columns: tuple[str, ...]
  invalid: float | int
  main_metric: str
  score_name: str                                 # what tables call its headline score
  abaw6_baseline: float                           # ABAW6's official baseline (real Aff-Wild2
                                                  # validation set): a reference point only
  value_range: tuple[float, float] = (-1.0, 1.0)  # regression: where valid values lie

  @property
  def out_dim(self) -> int:
    """Model outputs per frame: a value per column, or a logit per class / unit."""
    return len(self.columns)

  @property
  def label_width(self) -> int:
    """Values per line of its annotation and prediction files (one class index for a
    multiclass task)."""
    return 1 if self.kind == MULTICLASS else len(self.columns)

  @property
  def label_shape(self) -> tuple[int, ...]:
    """A frame's label: [] for a class index, else [columns]."""
    return () if self.kind == MULTICLASS else (len(self.columns),)

  @property
  def dtype(self) -> type:
    return np.float32 if self.kind == REGRESSION else np.int32

  @property
  def header(self) -> str:
    return ",".join(self.columns)

  @property
  def test_list(self) -> str:
    """The file at a dataset root that lists its test videos."""
    return f"{self.dirs[0]}_test_set.txt"

  def valid(self, labels: np.ndarray) -> np.ndarray:
    """bool [T]: frames whose label is not the invalid marker (in any of its columns)."""
    labels = np.asarray(labels)
    if self.kind == MULTICLASS:
      return labels != self.invalid
    return (labels != self.invalid).all(axis=-1)

  def invalid_labels(self, num_frames: int) -> np.ndarray:
    return np.full((num_frames, *self.label_shape), self.invalid, self.dtype)

  # ---- Its files ----

  def bad_rows(self, values: np.ndarray) -> np.ndarray:
    """Row indices of float [N, label_width] values that break its range rule."""
    if self.kind == REGRESSION:
      lo, hi = self.value_range
      ok = ((values >= lo) & (values <= hi)) | (values == self.invalid)
    elif self.kind == MULTICLASS:
      ok = (values == np.round(values)) & (values >= self.invalid) & (values <= self.out_dim - 1)
    else:
      ok = np.isin(values, (self.invalid, 0, 1))
    return np.flatnonzero(~ok.all(axis=1))

  @property
  def range_rule(self) -> str:
    if self.kind == REGRESSION:
      lo, hi = self.value_range
      return f"values must be in [{lo:g}, {hi:g}] or {self.invalid:g} (invalid)"
    if self.kind == MULTICLASS:
      return f"value must be an integer in {self.invalid}..{self.out_dim - 1}"
    return f"values must be 0, 1 or {self.invalid} (invalid)"

  def labels_from(self, values: np.ndarray) -> np.ndarray:
    """Checked float [N, label_width] values -> labels [N, *label_shape] of its dtype."""
    values = np.asarray(values)
    return (values[:, 0] if self.kind == MULTICLASS else values).astype(self.dtype)

  def format_label(self, row) -> str:
    """One annotation line: values to 3 decimals (a frame invalid in any column is invalid
    in all), class indices and 0/1 as integers."""
    row = np.asarray(row).reshape(-1)
    if self.kind != REGRESSION:
      return ",".join(str(int(x)) for x in row)
    if (row == self.invalid).any():
      return ",".join(f"{self.invalid:g}" for _ in row)
    return ",".join(f"{x:.3f}" for x in row)

  def format_prediction(self, row) -> str:
    """One submission line's values: 4 decimals, or integers."""
    row = np.asarray(row).reshape(-1)
    if self.kind == REGRESSION:
      return ",".join(f"{x:.4f}" for x in row)
    return ",".join(str(int(x)) for x in row)

  # ---- Its outputs ----

  def activate(self, logits):
    """Model outputs -> what overlapping windows average: values, or probabilities
    (softmax over classes, a sigmoid per unit). jax arrays."""
    import jax
    if self.kind == MULTICLASS:
      return jax.nn.softmax(logits, axis=-1)
    if self.kind == MULTILABEL:
      return jax.nn.sigmoid(logits)
    return logits

  def decide(self, outputs: np.ndarray, thresholds=0.5) -> np.ndarray:
    """Merged outputs -> submitted values: clipped to the range, the likeliest class, or
    each unit's probability against its threshold."""
    if self.kind == REGRESSION:
      return np.clip(outputs, *self.value_range)
    if self.kind == MULTICLASS:
      return np.asarray(outputs).argmax(-1)
    return (np.asarray(outputs) >= np.asarray(thresholds)).astype(np.int32)


VA = Task("VA", REGRESSION, ("VA_Estimation_Challenge",), ("valence", "arousal"), -5.0, "mean",
          "CCC", 0.22)
# ABAW5 and earlier called the expression folder "EXPR_Classification_Challenge".
EXPR = Task("EXPR", MULTICLASS, ("EXPR_Recognition_Challenge", "EXPR_Classification_Challenge"),
            ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other"),
            -1, "f1", "F1", 0.25)
AU = Task("AU", MULTILABEL, ("AU_Detection_Challenge",),
          ("AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU15", "AU23", "AU24", "AU25",
           "AU26"), -1, "f1", "F1", 0.39)

REGISTRY = {t.name: t for t in (VA, EXPR, AU)}
NAMES = tuple(REGISTRY)
# The ABAW tasks' names and markers under the names the format has always had.
VA_NAMES, EXPR_NAMES, AU_NAMES = VA.columns, EXPR.columns, AU.columns
INVALID_VA, INVALID_EXPR, INVALID_AU = VA.invalid, EXPR.invalid, AU.invalid


def get(name: str) -> Task:
  try:
    return REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; expected one of {NAMES}") from None
