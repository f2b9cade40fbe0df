"""Aff-Wild2's file formats, driven by the task records (`affect_jax.tasks`): the layout's
names, annotation files (parsed with errors naming file and line, and written), validity.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from affect_jax import tasks
from affect_jax.fileio import write_text_atomic

# ---- Constants of the format (shared by the reader, the synthetic writer, predict) ----

TASKS = tasks.NAMES
# Folder names per task; the first is the one we write, all are accepted when reading.
TASK_DIRS = {t.name: t.dirs for t in tasks.REGISTRY.values()}

# The header line of each task's annotation files, and its columns.
TASK_COLUMNS = {t.name: t.columns for t in tasks.REGISTRY.values()}

TRAIN_SET = "Train_Set"
VALIDATION_SET = "Validation_Set"
SPLITS = (TRAIN_SET, VALIDATION_SET)
TEST_SET = "Test_Set"  # not a folder: test videos are listed in <TaskDir>_test_set.txt

FRAMES_DIR = "cropped_aligned"
AUDIO_DIR = "audio"
TEST_LABELS_DIR = "test_labels"
FRAME_EXT = ".jpg"
AUDIO_RATE = 16000

# Label rows and frame images of a video may disagree at the end (the annotation runs past the
# last detected face, or a few images past the last label row). Up to this fraction of the
# frames is a warning; more is an error (an annotation of another video, a cut frames folder).
# Stages read it from `config.data.max_unmatched_frames`.
MAX_UNMATCHED_FRAMES = 0.1


def frame_name(index: int) -> str:
  """1-based frame index -> file name, e.g. 1 -> '00001.jpg'."""
  return f"{index:05d}{FRAME_EXT}"


def task_test_list(task: str) -> str:
  """File at the dataset root listing a task's test videos."""
  return tasks.get(task).test_list


# ---- Errors ----


class AnnotationError(ValueError):
  """A malformed annotation file; the message starts with `path:line:`."""

  def __init__(self, path, line: int | None, what: str):
    where = f"{path}:{line}" if line is not None else f"{path}"
    super().__init__(f"{where}: {what}")
    self.path = str(path)
    self.line = line


# ---- Annotation files ----


def _looks_numeric(fields: list[str]) -> bool:
  try:
    [float(f) for f in fields]
  except ValueError:
    return False
  return True


def parse_annotation(path: str | os.PathLike, task: str) -> np.ndarray:
  """Reads one `<video>.txt` of a task.

  Returns VA float32 [T, 2], EXPR int32 [T], AU int32 [T, 12]; row k is frame k+1.
  Raises AnnotationError naming the file and 1-based line for anything malformed.
  """
  spec = tasks.get(task)
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8-sig")  # many editors start UTF-8 with a BOM
  except UnicodeDecodeError as e:
    raise AnnotationError(path, None, f"not a text file ({e})") from None
  lines = text.splitlines()
  while lines and not lines[-1].strip():  # tolerate trailing blank lines only
    lines.pop()
  if not lines:
    raise AnnotationError(path, 1, "empty file: expected the header line "
                          f"'{spec.header}' and one line per frame")
  header = [f.strip() for f in lines[0].split(",")]
  if header != list(spec.columns):
    if _looks_numeric(header):
      raise AnnotationError(path, 1, f"missing header line: expected '{spec.header}', "
                            f"found data '{lines[0].strip()}'")
    raise AnnotationError(path, 1, f"unexpected header '{lines[0].strip()}' for task {task}: "
                          f"expected '{spec.header}'")
  if len(lines) == 1:
    raise AnnotationError(path, 2, "no frame lines after the header")

  width = spec.label_width
  rows = [line.split(",") for line in lines[1:]]
  for k, row in enumerate(rows):
    if len(row) != width:
      raise AnnotationError(path, k + 2, f"expected {width} comma-separated value(s) for task "
                            f"{task}, found {len(row)}: '{lines[k + 1].strip()}'")
  try:
    values = np.asarray(rows, dtype=np.float64)
  except ValueError:
    for k, row in enumerate(rows):  # slow path only to name the offending line
      if not _looks_numeric(row):
        raise AnnotationError(path, k + 2, f"non-numeric value in '{lines[k + 1].strip()}'") from None
    raise
  if not np.isfinite(values).all():
    k = int(np.flatnonzero(~np.isfinite(values).all(axis=1))[0])
    raise AnnotationError(path, k + 2, f"non-finite value in '{lines[k + 1].strip()}'")
  bad = spec.bad_rows(values)
  if bad.size:
    k = int(bad[0])
    raise AnnotationError(path, k + 2, f"{spec.range_rule}; found '{lines[k + 1].strip()}'"
                          + (f" ({bad.size} such lines)" if bad.size > 1 else ""))
  return spec.labels_from(values)


def valid_frames(task: str, labels: np.ndarray) -> np.ndarray:
  """bool [T]: frames whose label is not the task's invalid marker."""
  return tasks.get(task).valid(labels)


def write_annotation(path: str | os.PathLike, task: str, labels: np.ndarray) -> None:
  """Writes labels in the task's format, atomically (temp file + rename)."""
  spec = tasks.get(task)
  rows = np.asarray(labels).reshape(-1, spec.label_width)
  write_text_atomic(path, "\n".join([spec.header, *map(spec.format_label, rows)]) + "\n")


def invalid_labels(task: str, num_frames: int) -> np.ndarray:
  """A task's labels of `num_frames` frames, all invalid."""
  return tasks.get(task).invalid_labels(num_frames)
