"""An Aff-Wild2 tree: where videos, frames, audio and annotations are, which frames have an
image (and the repair of those that do not), a video's labels, a split's videos."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

from absl import logging
import numpy as np

from affect_jax.data.affwild2.formats import (
    AUDIO_DIR, FRAME_EXT, FRAMES_DIR, MAX_UNMATCHED_FRAMES, SPLITS, TASK_DIRS, TEST_LABELS_DIR,
    TEST_SET, AnnotationError, frame_name, invalid_labels, parse_annotation, task_test_list,
    valid_frames)
from affect_jax.fileio import stat_fingerprint

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




def load_split(root: str | os.PathLike, task: str, split: str, with_test_labels: bool = False,
               max_unmatched: float = MAX_UNMATCHED_FRAMES) -> list[VideoLabels]:
  return [load_video(root, task, split, v, with_test_labels, max_unmatched)
          for v in list_videos(root, task, split)]
