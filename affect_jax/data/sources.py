"""Where a stage's images come from: `config.data.source`.

  'folders'  the trees as they are: face-image roots, an Aff-Wild2 tree (`data.root`)
  'tfds'     ArrayRecord datasets built once by launch/build_tfds.py (`tfds_builders`):
             `data.tfds_dir` is the aff_wild2_frames dataset directory
             (<data_dir>/aff_wild2_frames/<version>); pretraining reads `data.roots` as
             face_images / aff_wild2_frames dataset directories

Both give the loaders the same records in the same order, so a run's batches do not depend
on the choice; only how fast they arrive does.
"""

from __future__ import annotations

import os
from typing import Sequence

import ml_collections
import numpy as np

from affect_jax.data import affwild2, faces

SOURCES = ("folders", "tfds")


def source(config: ml_collections.ConfigDict) -> str:
  kind = config.data.get("source", "folders")
  if kind not in SOURCES:
    raise ValueError(f"config.data.source: unknown {kind!r} (folders | tfds)")
  return kind


class FolderFrames:
  """An Aff-Wild2 tree read as it is, with the reading interface of the built dataset
  (`tfds_builders.FramesDataset`): the videos, which frames have an image, a fingerprint of a
  video's images, and the records the pipelines take (image paths). `num_frames`
  ({video: frames}) stands in for the annotations and test lists in a tree that has none
  (a video file's crops: `affect_jax.analyze`)."""

  def __init__(self, root: str | os.PathLike, max_unmatched: float = affwild2.MAX_UNMATCHED_FRAMES,
               num_frames: dict[str, int] | None = None):
    self.directory = str(root)
    self._max_unmatched = max_unmatched
    self._num_frames: dict[str, int] = dict(num_frames or {})

  def videos(self, with_test: bool = True) -> dict[str, int]:
    """{video: num_frames}: `affwild2.all_videos`."""
    videos = affwild2.all_videos(self.directory, with_test, self._max_unmatched)
    self._num_frames.update(videos)
    return videos

  def _frames(self, video: str) -> int:
    if not self._num_frames:
      self.videos()
    return self._num_frames[video]

  def has_image(self, video: str) -> np.ndarray:
    return affwild2.image_mask(self.directory, video, self._frames(video))

  def fingerprint(self, video: str) -> str:
    """The names, sizes and mtimes of the video's images (`affwild2.frames_fingerprint`)."""
    return affwild2.frames_fingerprint(self.directory, video, self._frames(video))

  def where(self, video: str) -> str:
    """The video's images, for messages."""
    return os.path.join(self.directory, affwild2.FRAMES_DIR, video)

  def _path(self, video: str, frame: int) -> str:
    return os.path.join(self.directory, affwild2.FRAMES_DIR, video, affwild2.frame_name(frame + 1))

  def expr_records(self, split: str) -> list[dict]:
    """{'path', 'label'} for every frame of the EXPR `split` with a valid label. A labelled
    frame without an image takes its nearest image (DESIGN.md's repair rule)."""
    records = []
    for v in affwild2.load_split(self.directory, "EXPR", split, max_unmatched=self._max_unmatched):
      src = affwild2.nearest_image(v.has_image, self.where(v.video))
      records += [{"path": self._path(v.video, int(src[t])), "label": np.int32(v.labels[t])}
                  for t in np.flatnonzero(v.valid)]
    if not records:
      raise ValueError(f"{self.directory}: no valid EXPR labels in {split}")
    return records

  def image_records(self, videos: Sequence[str]) -> list[dict]:
    """{'path', 'video', 'frame'} of each frame with an image of `videos` (video = position
    in `videos`), in order."""
    return [{"path": self._path(v, int(k)), "video": np.int32(i), "frame": np.int32(k)}
            for i, v in enumerate(videos) for k in np.flatnonzero(self.has_image(v))]


def frames(config: ml_collections.ConfigDict):
  """The Aff-Wild2 frames a config reads: `FolderFrames` of data.root ('folders') or the
  built dataset at data.tfds_dir ('tfds'); the same interface, the same records."""
  if source(config) == "folders":
    return FolderFrames(config.data.root, affwild2.max_unmatched(config))
  if not config.data.get("tfds_dir"):
    raise ValueError("config.data.source='tfds' needs config.data.tfds_dir: an aff_wild2_frames "
                     "dataset directory written by launch/build_tfds.py")
  from affect_jax.data import tfds_builders
  return tfds_builders.FramesDataset(config.data.tfds_dir)


def face_roots(config: ml_collections.ConfigDict) -> list[str]:
  """Pretraining's roots: `data.roots` (comma-separated), else Aff-Wild2's own frames."""
  if config.data.roots:
    return [r for r in config.data.roots.split(",") if r]
  if source(config) == "tfds":
    return [frames(config).directory]
  return [os.path.join(config.data.root, affwild2.FRAMES_DIR)]


def face_items(config: ml_collections.ConfigDict) -> Sequence:
  """Pretraining's images: paths (folders) or `tfds_builders.Records` (tfds)."""
  roots = face_roots(config)
  if source(config) == "tfds":
    from affect_jax.data import tfds_builders
    return tfds_builders.face_records(roots)
  return faces.index_roots(roots, cache_dir=os.path.expanduser(config.data.index_cache))
