"""ABAW prediction files: one CSV per task, one row per frame, written and read back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from affect_jax import tasks
from affect_jax.data.affwild2.formats import FRAME_EXT, AnnotationError, frame_name
from affect_jax.fileio import write_shared_text

# ---- ABAW prediction files (one CSV per task) ----


def prediction_header(task: str) -> str:
  return "image_location," + tasks.get(task).header


def write_predictions(path: str | os.PathLike, task: str, predictions: dict[str, np.ndarray]) -> None:
  """The ABAW submission CSV: one row per frame, `<video>/00001.jpg,<values>`; VA two floats,
  Expr one class index, AU twelve 0/1. Written atomically."""
  spec = tasks.get(task)
  lines = [prediction_header(task)]
  for video in sorted(predictions):
    values = np.asarray(predictions[video])
    for k, row in enumerate(values.reshape(len(values), -1)):
      lines.append(f"{video}/{frame_name(k + 1)},{spec.format_prediction(row)}")
  write_shared_text(path, "\n".join(lines) + "\n")


def parse_predictions(path: str | os.PathLike, task: str) -> dict[str, np.ndarray]:
  """Reads an ABAW prediction CSV back into {video: values}; frames must run 1..T in order.
  Errors name the file and line."""
  path = Path(path)
  lines = [l for l in path.read_text().splitlines()]
  if not lines or lines[0].strip() != prediction_header(task):
    raise AnnotationError(path, 1, f"expected header '{prediction_header(task)}'")
  spec = tasks.get(task)
  width = spec.label_width
  rows: dict[str, list] = {}
  for n, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    cells = line.split(",")
    if len(cells) != width + 1:
      raise AnnotationError(path, n, f"expected image_location and {width} value(s), found "
                            f"{len(cells) - 1}")
    video, _, frame = cells[0].rpartition("/")
    if not video or not frame.endswith(FRAME_EXT) or not frame[: -len(FRAME_EXT)].isdigit():
      raise AnnotationError(path, n, f"bad image_location '{cells[0]}' (expected <video>/00001.jpg)")
    got = rows.setdefault(video, [])
    if int(frame[: -len(FRAME_EXT)]) != len(got) + 1:
      raise AnnotationError(path, n, f"{video}: frame {frame} out of order (expected "
                            f"{frame_name(len(got) + 1)})")
    try:
      got.append([float(c) for c in cells[1:]])
    except ValueError:
      raise AnnotationError(path, n, f"non-numeric value in '{line.strip()}'") from None
  out = {}
  for video, values in rows.items():
    arr = np.asarray(values)
    bad = spec.bad_rows(arr)
    if bad.size:
      raise AnnotationError(path, None, f"{video}: {spec.range_rule} (frame {int(bad[0]) + 1})")
    out[video] = spec.labels_from(arr)
  return out
