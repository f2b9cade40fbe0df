"""Fixed-length segments of per-frame features and labels, and the overlap merge back.

The temporal model sees windows of `segment_len` frames taken every `stride` frames (the
paper: 300 and 200). The last window of a video is aligned to its end, so every frame is in
some window and no tail is dropped; a video shorter than one window is padded at the end and
masked. At inference the per-window predictions are merged into exactly one per frame by
averaging all windows that cover it.

  segment_starts / cut / merge       numpy, one video
  make_segments / SegmentSource      (video, start) records -> dict of arrays, for grain
  segment_dataset                    shuffle -> repeat -> this process's rows -> batch
  predict_windows                    one whole video -> windows for the model
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Mapping, Sequence

import grain
import numpy as np

from affect_jax import tasks
from affect_jax.data import affwild2, loaders
from affect_jax.data.features import FeatureStore

SEGMENT_LEN = 300
STRIDE = 200
WEIGHTINGS = ("uniform", "triangular")



# ---- One video: window starts, cutting, merging ----


def segment_starts(num_frames: int, segment_len: int, stride: int) -> np.ndarray:
  """int64 [N]: 0-based start frames of the windows covering a video.

  Every `stride` frames, plus one window ending on the last frame when the regular ones
  stop short of it; a video shorter than `segment_len` gets one window at 0 (padded).
  E.g. (700, 300, 200) -> [0, 200, 400]; (301, 300, 200) -> [0, 1].
  """
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  if segment_len < 1 or stride < 1:
    raise ValueError(f"segment_len and stride must be >= 1, got {segment_len} and {stride}")
  if stride > segment_len:
    raise ValueError(f"stride ({stride}) > segment_len ({segment_len}) would leave frames "
                     "between windows that no window covers; use stride <= segment_len")
  last = max(num_frames - segment_len, 0)
  starts = np.arange(0, last + 1, stride, dtype=np.int64)
  if starts[-1] != last:
    starts = np.append(starts, last)
  return starts


def _check_starts(starts, num_frames: int) -> np.ndarray:
  starts = np.asarray(starts)
  if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer):
    raise ValueError(f"starts must be a 1-D integer array, got {starts.dtype} {starts.shape}")
  if starts.size and (starts.min() < 0 or starts.max() >= num_frames):
    raise ValueError(f"starts must lie in [0, {num_frames}), got {starts.min()}..{starts.max()}")
  return starts.astype(np.int64)


def cut(array, starts, segment_len: int, pad_value=0) -> tuple[np.ndarray, np.ndarray]:
  """Windows of a per-frame array: [T, ...] -> ([N, L, ...], frame mask float32 [N, L]).

  Positions past the video's end hold `pad_value` and mask 0. Works on a memory map
  reading only the rows the windows need.
  """
  array = np.asarray(array)  # a view, even of a memory map: nothing is read yet
  num_frames = array.shape[0]
  starts = _check_starts(starts, num_frames)
  idx = starts[:, None] + np.arange(segment_len)  # [N, L]
  real = idx < num_frames
  out = np.asarray(array[np.minimum(idx, num_frames - 1)])
  out[~real] = pad_value
  return out, real.astype(np.float32)


def window_weights(segment_len: int, weighting: str = "uniform") -> np.ndarray:
  """float64 [L]: how much each position of a window counts in the overlap merge.

  'triangular' is min(p + 1, L - p): peaks at the centre, where the model saw the most
  context on both sides, and stays >= 1 at the edges, so a frame only one window's edge
  covers still gets that prediction. Integer-valued, so merging equal values is exact.
  """
  if weighting == "uniform":
    return np.ones(segment_len)
  if weighting == "triangular":
    p = np.arange(segment_len)
    return np.minimum(p + 1, segment_len - p).astype(np.float64)
  raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")


def merge(window_preds, starts, num_frames: int, *, weighting: str = "uniform",
          mask=None) -> np.ndarray:
  """Overlap merge: [N, L, ...] window predictions -> float32 [num_frames, ...].

  Each frame gets the weighted average of every window position that covers it. Average
  probabilities or values (apply softmax/sigmoid first), not logits. Positions with
  `mask` 0 or past `num_frames` are ignored, whatever they hold.
  """
  preds = np.asarray(window_preds)
  starts = _check_starts(starts, num_frames)
  if preds.ndim < 2 or preds.shape[0] != starts.size:
    raise ValueError(f"window_preds {preds.shape} must be [N, L, ...] with N = {starts.size} "
                     "(one window per start)")
  n, length = preds.shape[:2]
  idx = starts[:, None] + np.arange(length)  # [N, L]
  keep = idx < num_frames
  if mask is not None:
    mask = np.asarray(mask)
    if mask.shape != (n, length):
      raise ValueError(f"mask {mask.shape} must be [N, L] = {(n, length)}")
    keep &= mask > 0
  # Select instead of multiplying by zero weights, so inf/nan in padding cannot leak in.
  weights = np.broadcast_to(window_weights(length, weighting), (n, length))[keep]
  values = preds.reshape(n, length, -1)[keep].astype(np.float64)  # [M, K]
  frames = idx[keep]
  total = np.zeros((num_frames, values.shape[1]))
  np.add.at(total, frames, weights[:, None] * values)
  norm = np.bincount(frames, weights=weights, minlength=num_frames)
  uncovered = np.flatnonzero(norm == 0)
  if uncovered.size:
    raise ValueError(f"{uncovered.size} of {num_frames} frames are covered by no (unmasked) "
                     f"window, first {uncovered[0]}")
  return (total / norm[:, None]).astype(np.float32).reshape((num_frames, *preds.shape[2:]))


# ---- Training records and the grain source ----


@dataclasses.dataclass(frozen=True)
class Video:
  name: str
  num_frames: int


def _name_and_length(video) -> tuple[str, int]:
  """A video as a Mapping or an object with a name ('name' or 'video') and 'num_frames';
  so `Video`, plain dicts and `affwild2.VideoLabels` all work."""
  if isinstance(video, Mapping):
    name, num_frames = video.get("name", video.get("video")), video.get("num_frames")
  else:
    name = getattr(video, "name", None) or getattr(video, "video", None)
    num_frames = getattr(video, "num_frames", None)
  if name is None or num_frames is None:
    raise ValueError(f"a video needs a name (or video) and num_frames, got {video!r}")
  return str(name), int(num_frames)


def make_segments(videos: Sequence, segment_len: int = SEGMENT_LEN,
                  stride: int = STRIDE) -> list[tuple[str, int]]:
  """(video name, start frame) of every window of every video, in video order."""
  out = []
  for video in videos:
    name, num_frames = _name_and_length(video)
    out.extend((name, int(s)) for s in segment_starts(num_frames, segment_len, stride))
  return out


class SegmentSource:
  """grain random-access source of training segments.

  `stores` maps a modality name ('visual', 'audio', ...) to its FeatureStore; `labels` maps
  a video to its labels in the task's format (VA float32 [T, 2], EXPR int32 [T], AU int32
  [T, 12]). Videos are taken in sorted order; `video_index` indexes `self.videos`.
  Element i: {<modality>: float32 [L, D], 'label': [L, ...], 'frame_mask': float32 [L]
  (real frames: the model's padding mask), 'label_mask': float32 [L] (real frames with a
  valid label: the loss mask), 'video_index': int32, 'start': int32}. Features are read
  from the stores' memory maps per element, so memory stays small.
  """

  def __init__(self, stores: Mapping[str, FeatureStore], labels: Mapping[str, np.ndarray],
               task: str, *, segment_len: int = SEGMENT_LEN, stride: int = STRIDE):
    if task not in affwild2.TASKS:
      raise ValueError(f"unknown task {task!r}; expected one of {affwild2.TASKS}")
    if not stores:
      raise ValueError("SegmentSource needs at least one feature store")
    self.stores = dict(stores)
    self.task = task
    self.segment_len = segment_len
    self.videos = sorted(labels)
    self.labels = {v: self._checked_labels(v, labels[v]) for v in self.videos}
    for video in self.videos:
      self._check_features(video)
    self.video_index = {v: i for i, v in enumerate(self.videos)}
    self._open: dict = {}
    self._lock = threading.Lock()
    self.segments = make_segments([Video(v, len(self.labels[v])) for v in self.videos],
                                  segment_len, stride)

  def _checked_labels(self, video: str, labels) -> np.ndarray:
    spec = tasks.get(self.task)
    labels = np.asarray(labels, dtype=spec.dtype)
    expected = ("T", *spec.label_shape)
    if labels.ndim != len(expected) or labels.shape[1:] != spec.label_shape:
      raise ValueError(f"{video}: {self.task} labels of shape {labels.shape}, expected "
                       f"[{', '.join(map(str, expected))}]")
    return labels

  def _check_features(self, video: str) -> None:
    """Features and labels must share the frame clock; say which store is off."""
    for name, store in self.stores.items():
      num_frames = store.meta(video)["num_frames"]
      if num_frames != len(self.labels[video]):
        raise ValueError(f"{video}: {name} features have {num_frames} frames in {store.root}, "
                         f"labels have {len(self.labels[video])}")

  def __len__(self) -> int:
    return len(self.segments)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    video, start = self.segments[index]
    out = {}
    for name in self.stores:
      out[name] = cut(self._features(name, video), [start], self.segment_len)[0][0].astype(np.float32)
    # Padded with the invalid marker, so padded frames read as invalid labels too.
    label, frame_mask = cut(self.labels[video], [start], self.segment_len,
                            tasks.get(self.task).invalid)
    label, frame_mask = label[0], frame_mask[0]
    out["label"] = label
    out["frame_mask"] = frame_mask
    out["label_mask"] = frame_mask * affwild2.valid_frames(self.task, label)
    out["video_index"] = np.int32(self.video_index[video])
    out["start"] = np.int32(start)
    return out

  def _features(self, name: str, video: str) -> np.ndarray:
    """The video's memory map, opened once per process. grain reads elements from several
    threads, and opening is serialised: numpy parses .npy headers with ast.literal_eval,
    which is not thread-safe in CPython 3.11 (it fails with 'AST constructor recursion
    depth mismatch')."""
    key = (name, video)
    arr = self._open.get(key)
    if arr is None:
      with self._lock:
        arr = self._open.get(key)
        if arr is None:
          arr = self._open[key] = self.stores[name].read(video)
    return arr

  def __getstate__(self):  # memory maps and locks stay behind when pickled to workers
    state = dict(self.__dict__)
    state["_open"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return (f"SegmentSource(task={self.task}, modalities={list(self.stores)}, "
            f"videos={len(self.videos)}, segments={len(self)}, segment_len={self.segment_len})")


def segment_dataset(source: SegmentSource, *, batch_size: int, seed: int, shuffle: bool,
                    num_epochs: int | None, drop_remainder: bool,
                    shard_index: int | None = None,
                    shard_count: int | None = None) -> grain.IterDataset:
  """Batches of segments: each leaf of an element gains a leading [B] axis.

  `batch_size` is this process's share of the global batch: each process reads only its
  rows of every global batch (`loaders.process_rows`, process index/count by default), so
  the global batches do not depend on the number of processes. With `shuffle`, every epoch
  has its own order, fixed by `seed`. `num_epochs=None` repeats forever.
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = loaders.process_rows(ds.repeat(num_epochs), batch_size, shard_index, shard_count)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=drop_remainder)


# ---- Inference on one whole video ----


def predict_windows(features: Mapping[str, np.ndarray], segment_len: int = SEGMENT_LEN,
                    stride: int = STRIDE) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """One video's per-modality [T, D] features -> ({modality: float32 [N, L, D]},
  frame mask float32 [N, L], starts [N]); `merge` takes the model's outputs back."""
  lengths = {name: len(x) for name, x in features.items()}
  if not lengths or len(set(lengths.values())) != 1:
    raise ValueError(f"need features of one common length per modality, got {lengths}")
  starts = segment_starts(next(iter(lengths.values())), segment_len, stride)
  inputs, frame_mask = {}, None
  for name, x in features.items():
    windows, frame_mask = cut(x, starts, segment_len)
    inputs[name] = windows.astype(np.float32)
  return inputs, frame_mask, starts
