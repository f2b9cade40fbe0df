"""Aff-Wild2 as ABAW distributes it: layout, annotation files, splits and folds.

The real dataset and the synthetic one (`affect_jax.data.synthetic`) are read by this
same code. Layout (DESIGN.md, "Aff-Wild2 on disk"):

  <root>/cropped_aligned/<video>/00001.jpg          1-based, 5 digits, some missing
  <root>/<TaskDir>/{Train_Set,Validation_Set}/<video>.txt
  <root>/<TaskDir>_test_set.txt                      test videos, one name a line
  <root>/test_labels/<TaskDir>/<video>.txt           (synthetic only) held-out labels
  <root>/audio/<video>.wav
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from absl import logging
import numpy as np

from affect_jax import tasks
from affect_jax.fileio import stat_fingerprint, write_shared_text, write_text_atomic

# ---- Constants of the format (shared by the reader, the synthetic writer, predict) ----

TASKS = tasks.NAMES
# Folder names per task; the first is the one we write, all are accepted when reading.
TASK_DIRS = {t.name: t.dirs for t in tasks.REGISTRY.values()}

VA_NAMES, EXPR_NAMES, AU_NAMES = tasks.VA.columns, tasks.EXPR.columns, tasks.AU.columns

# The header line of each task's annotation files, and its columns.
TASK_COLUMNS = {t.name: t.columns for t in tasks.REGISTRY.values()}
# Number of values on each data line (Expr files hold one class index per line).
TASK_WIDTH = {t.name: t.label_width for t in tasks.REGISTRY.values()}

INVALID_VA, INVALID_EXPR, INVALID_AU = tasks.VA.invalid, tasks.EXPR.invalid, tasks.AU.invalid

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


# ---- Videos, frames, splits ----


def source_video(video: str) -> str:
  """Two-subject videos are `<source>_left` / `<source>_right`; both share the source's audio."""
  for suffix in ("_left", "_right"):
    if video.endswith(suffix):
      return video[: -len(suffix)]
  return video


def audio_path(root: str | os.PathLike, video: str) -> Path:
  return Path(root) / AUDIO_DIR / f"{source_video(video)}.wav"


def task_dir(root: str | os.PathLike, task: str) -> Path:
  """The task's annotation folder, accepting every name ABAW has used for it."""
  root = Path(root)
  for name in TASK_DIRS[task]:
    if (root / name).is_dir():
      return root / name
  raise FileNotFoundError(f"{root}: no annotation folder for task {task} "
                          f"(looked for {', '.join(TASK_DIRS[task])})")


@functools.lru_cache(maxsize=4096)
def _image_indices(frames_dir: str, mtime_ns: int) -> tuple[int, ...]:
  del mtime_ns  # a key only: adding or removing a file changes the folder's mtime
  names = (e.name for e in os.scandir(frames_dir) if e.name.endswith(FRAME_EXT))
  return tuple(sorted(int(n[: -len(FRAME_EXT)]) for n in names if n[: -len(FRAME_EXT)].isdigit()))


def image_indices(root: str | os.PathLike, video: str) -> np.ndarray:
  """Sorted 1-based indices of the frames of `video` that have a cropped image."""
  frames_dir = Path(root) / FRAMES_DIR / video
  if not frames_dir.is_dir():
    raise FileNotFoundError(f"{frames_dir}: no frames folder for video {video!r}")
  return np.asarray(_image_indices(str(frames_dir), frames_dir.stat().st_mtime_ns), dtype=np.int64)


def frames_fingerprint(root: str | os.PathLike, video: str, num_frames: int) -> str:
  """What a video's visual features are made from: the names, sizes and mtimes of its frame
  images 1..num_frames (`fileio.stat_fingerprint`). A replaced, added or removed image
  changes it."""
  frames_dir = Path(root) / FRAMES_DIR / video
  indices = image_indices(root, video)
  return stat_fingerprint([frames_dir / frame_name(int(i)) for i in indices if i <= num_frames],
                          frames_dir)


def audio_fingerprint(root: str | os.PathLike, video: str) -> str:
  """What a video's audio features are made from: its WAV's size and mtime."""
  path = audio_path(root, video)
  return stat_fingerprint([path], path.parent)


def image_mask(root: str | os.PathLike, video: str, num_frames: int) -> np.ndarray:
  """bool [num_frames]: which frames of `video` have a cropped image (row k = frame k+1;
  images numbered past `num_frames` are ignored)."""
  return _has_image(image_indices(root, video), num_frames)


def nearest_image(has_image: np.ndarray, frames_dir: str | os.PathLike | None = None) -> np.ndarray:
  """int [T]: for each frame, the 0-based frame whose image stands in for it.

  A frame without an image takes the previous available frame (the next one before a
  video's first image), as the authors did. Frames with an image map to themselves.
  `frames_dir` (the video's image folder) names the culprit when there is no image at all.
  """
  has_image = np.asarray(has_image, dtype=bool)
  if not has_image.any():
    where = f"{frames_dir}: " if frames_dir is not None else ""
    raise ValueError(f"{where}no frame image at all (an empty or missing frames folder; "
                     f"expected {frame_name(1)} ... {frame_name(max(has_image.size, 1))})")
  idx = np.arange(has_image.size)
  prev = np.maximum.accumulate(np.where(has_image, idx, -1))
  first = int(np.argmax(has_image))
  return np.where(prev >= 0, prev, first)


def repair_frames(rows: dict[int, np.ndarray], num_frames: int,
                  frames_dir: str | os.PathLike) -> tuple[np.ndarray, int]:
  """([num_frames, ...] rows, how many were repaired) from `rows` {0-based frame: row} of the
  frames whose image was read: every other frame (no image, or an unreadable one) takes the
  row of `nearest_image`'s stand-in. No row at all is an error naming `frames_dir`."""
  if not rows:
    raise ValueError(f"{frames_dir}: no readable frame image at all (every image is missing "
                     "or unreadable); replace or delete the files")
  got = np.zeros(num_frames, bool)
  got[list(rows)] = True
  return np.stack([rows[int(s)] for s in nearest_image(got)]), int(num_frames - got.sum())


@dataclasses.dataclass(frozen=True)
class VideoLabels:
  """One video's labels for one task, aligned with its frames (row k = frame k+1)."""
  video: str
  task: str
  split: str
  labels: np.ndarray     # VA float32 [T,2] | EXPR int32 [T] | AU int32 [T,12]
  has_image: np.ndarray  # bool [T]
  path: Path | None      # the annotation file it was read from

  @property
  def num_frames(self) -> int:
    return int(self.labels.shape[0])

  @property
  def valid(self) -> np.ndarray:
    """bool [T]; frames with an image but an invalid label are masked, never dropped."""
    return valid_frames(self.task, self.labels)

  @property
  def source_video(self) -> str:
    return source_video(self.video)


def _check_frames(root: Path, video: str, ann_path: Path) -> np.ndarray:
  try:
    return image_indices(root, video)
  except FileNotFoundError:
    raise AnnotationError(ann_path, None, f"annotation for video {video!r} has no frames "
                          f"folder {root / FRAMES_DIR / video}") from None


def _has_image(indices: np.ndarray, num_frames: int) -> np.ndarray:
  has = np.zeros(num_frames, dtype=bool)
  has[indices[(indices >= 1) & (indices <= num_frames)] - 1] = True
  return has


def list_videos(root: str | os.PathLike, task: str, split: str) -> list[str]:
  """Sorted video names of a task's split (Train_Set, Validation_Set or Test_Set)."""
  root = Path(root)
  if split == TEST_SET:
    lst = root / task_test_list(task)
    if not lst.is_file():
      raise FileNotFoundError(f"{lst}: no test list for task {task}")
    return sorted({line.strip() for line in lst.read_text().splitlines() if line.strip()})
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, TEST_SET)}")
  folder = task_dir(root, task) / split
  if not folder.is_dir():
    raise FileNotFoundError(f"{folder}: missing split folder")
  return sorted(p.stem for p in folder.glob("*.txt"))


def load_video(root: str | os.PathLike, task: str, split: str, video: str,
               with_test_labels: bool = False,
               max_unmatched: float = MAX_UNMATCHED_FRAMES) -> VideoLabels:
  """Labels of one video; for Test_Set they come from `test_labels/` (synthetic only)
  when `with_test_labels`, else they are all invalid (frame count from the images).

  The label rows set the frame count T; `check_frames` compares it with the images."""
  root = Path(root)
  if split == TEST_SET:
    ann = root / TEST_LABELS_DIR / TASK_DIRS[task][0] / f"{video}.txt"
    if with_test_labels:
      labels = parse_annotation(ann, task)
    else:
      indices = image_indices(root, video)
      n = int(indices.max()) if indices.size else 0
      labels = invalid_labels(task, n)
      ann = None
    indices = image_indices(root, video)
  else:
    ann = task_dir(root, task) / split / f"{video}.txt"
    labels = parse_annotation(ann, task)
    indices = _check_frames(root, video, ann)
  if ann is not None:
    check_frames(ann, root / FRAMES_DIR / video, labels.shape[0], indices, max_unmatched)
  return VideoLabels(video, task, split, labels, _has_image(indices, labels.shape[0]), ann)


_warned: set = set()


def max_unmatched(config) -> float:
  """A stage config's `data.max_unmatched_frames` (configs saved before it existed: the default)."""
  return float(config.data.get("max_unmatched_frames", MAX_UNMATCHED_FRAMES))


def check_frames(ann_path, frames_dir, num_frames: int, indices: np.ndarray,
                 max_unmatched: float = MAX_UNMATCHED_FRAMES) -> int:
  """Label rows vs frame images, the one rule every stage applies (the temporal stage's
  features are made on the label clock, so it inherits it).

  Images numbered past the last label row are never used; label rows past the last image
  reuse that image. Either is counted as unmatched: none is silent, up to `max_unmatched`
  of the frames is a warning (once per file), more is an AnnotationError naming both sides.
  Returns the unmatched count.
  """
  indices = np.asarray(indices)
  past = int((indices > num_frames).sum())
  inside = indices[indices <= num_frames]
  last = int(inside.max()) if inside.size else 0
  tail = num_frames - last
  unmatched = past + tail
  if not unmatched:
    return 0
  if not last:
    raise AnnotationError(ann_path, None, f"{frames_dir} holds no frame image for its "
                          f"{num_frames} label rows (expected {frame_name(1)} ... "
                          f"{frame_name(num_frames)}): an empty frames folder, or another "
                          "video's annotation")
  parts = []
  if past:
    parts.append(f"{past} image(s) in {frames_dir} past the last label row "
                 f"(up to {frame_name(int(indices.max()))}) are unused")
  if tail:
    parts.append(f"the last {tail} label row(s) have no image and reuse frame {frame_name(last)}")
  what = f"{num_frames} label rows, but " + "; ".join(parts)
  if unmatched > max_unmatched * num_frames:
    raise AnnotationError(ann_path, None, f"{what}: {unmatched / num_frames:.0%} of the frames, "
                          f"more than {max_unmatched:.0%}. Is this the annotation of this video? "
                          "(to accept it, raise --config.data.max_unmatched_frames)")
  key = (str(ann_path), num_frames, past, tail)
  if key not in _warned:
    _warned.add(key)
    logging.warning("%s: %s", ann_path, what)
  return unmatched


def invalid_labels(task: str, num_frames: int) -> np.ndarray:
  """A task's labels of `num_frames` frames, all invalid."""
  return tasks.get(task).invalid_labels(num_frames)


def load_split(root: str | os.PathLike, task: str, split: str, with_test_labels: bool = False,
               max_unmatched: float = MAX_UNMATCHED_FRAMES) -> list[VideoLabels]:
  return [load_video(root, task, split, v, with_test_labels, max_unmatched)
          for v in list_videos(root, task, split)]


# ---- Folds (the authors' 5-fold scheme) ----

NUM_FOLDS = 5


def all_videos(root: str | os.PathLike, with_test: bool = True,
               max_unmatched: float = MAX_UNMATCHED_FRAMES) -> dict[str, int]:
  """{video: num_frames} over every task's Train/Validation sets (and test lists)."""
  frames: dict[str, int] = {}
  for task in TASKS:
    try:
      task_dir(root, task)
    except FileNotFoundError:
      continue
    splits = [*SPLITS, TEST_SET] if with_test else list(SPLITS)
    for split in splits:
      try:
        names = list_videos(root, task, split)
      except FileNotFoundError:
        continue
      for name in names:
        n = load_video(root, task, split, name, max_unmatched=max_unmatched).num_frames
        if frames.get(name, n) != n:
          logging.warning("%s: %d frames in one task's annotations, %d in another's; using the "
                          "larger", name, frames[name], n)
        frames[name] = max(frames.get(name, 0), n)
  if not frames:
    raise FileNotFoundError(f"{root}: no annotated or test-listed videos")
  return dict(sorted(frames.items()))


def fold_videos(root: str | os.PathLike, task: str, fold: int) -> dict[str, list[str]]:
  """{'train': [...], 'val': [...]} video names of fold `fold`.

  Fold 0 is the official Train_Set/Validation_Set split. Folds 1-4 pool all train and
  validation videos and cut them into 4 parts, fold k validating on part k-1; a source
  video's `_left`/`_right` subjects always fall in the same part.
  """
  return fold_split(list_videos(root, task, TRAIN_SET), list_videos(root, task, VALIDATION_SET),
                    fold)


def fold_split(train: list[str], val: list[str], fold: int) -> dict[str, list[str]]:
  """`fold_videos` of a task whose official sets are `train` and `val`."""
  if fold == 0:
    return {"train": train, "val": val}
  if not 1 <= fold < NUM_FOLDS:
    raise ValueError(f"fold must be in 0..{NUM_FOLDS - 1}, got {fold}")
  parts = split_into_parts(sorted(train + val), NUM_FOLDS - 1)
  held = set(parts[fold - 1])
  pooled = sorted(train + val)
  return {"train": [v for v in pooled if v not in held], "val": sorted(held)}


def split_into_parts(videos: list[str], num_parts: int, seed: int = 0) -> list[list[str]]:
  """Deterministic partition of videos into parts, grouping by source video.

  Groups are shuffled with a fixed seed (so parts don't follow name order) and dealt
  round-robin, so part sizes differ by at most one group.
  """
  groups: dict[str, list[str]] = {}
  for v in sorted(videos):
    groups.setdefault(source_video(v), []).append(v)
  keys = sorted(groups)
  order = np.random.default_rng(seed).permutation(len(keys))
  parts: list[list[str]] = [[] for _ in range(num_parts)]
  for i, k in enumerate(order):
    parts[i % num_parts].extend(groups[keys[k]])
  return [sorted(p) for p in parts]


# ---- Summary ----


def summarize(root: str | os.PathLike, with_test_labels: bool = False) -> dict:
  """Per task and split: videos, frames, valid/invalid labels, frames without image."""
  root = Path(root)
  out: dict = {}
  for task in TASKS:
    try:
      task_dir(root, task)
    except FileNotFoundError:
      continue
    out[task] = {}
    for split in (*SPLITS, TEST_SET):
      try:
        videos = load_split(root, task, split, with_test_labels)
      except FileNotFoundError:
        continue
      valid = sum(int(v.valid.sum()) for v in videos)
      frames = sum(v.num_frames for v in videos)
      out[task][split] = {
          "videos": len(videos),
          "frames": frames,
          "valid": valid,
          "invalid": frames - valid,
          "without_image": sum(int((~v.has_image).sum()) for v in videos),
      }
  return out


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
