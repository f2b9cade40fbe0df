"""A video file -> its frames, its audio and one subject's face crops: the front of
`launch/analyze_video.py`, which then runs the trained models on the crops as on Aff-Wild2's
`cropped_aligned/` frames.

  info = probe(path)                        # frame rate, size, duration, audio or not
  for index, time_s, rgb in frames(path): ...
  samples = decode_audio(path, info)        # float32 mono at 16 kHz, sample 0 = frame 0's time
  detector = FaceDetector()                 # OpenCV's Haar frontal-face cascade
  track = follow_subject([detector(rgb) for ...], max_gap=...)
  boxes = crop_boxes(track.boxes, scale, shift)   # square crops in frame pixels
  roll = smooth_roll([EyeFinder()(rgb, box) ...], track.found)   # the face's roll
  crop(rgb, box, size, roll)                # [size, size, 3] uint8, levelled

Decoding is PyAV's: it links its own FFmpeg (every common container and codec, audio and
video, frame timestamps) into the wheel, so nothing is installed beside pip and nothing runs
as a subprocess. Faces are found by the Haar cascade that `opencv-python-headless<5` ships
inside the wheel (5.x no longer does), and its eye cascade gives the roll: no weights to
download, CPU only, frontal faces.
Both are the `video` extra (`pip install 'affect-jax[video]'`).

Frames are never dropped: a frame without the subject's face keeps its row, flagged, and
the models see the features of its nearest frame with a face (Aff-Wild2's repair rule).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence

import numpy as np

from affect_jax.data.affwild2 import AUDIO_RATE

EXTRA = "pip install 'affect-jax[video]'  (PyAV and opencv-python-headless<5)"


def _import(name: str):
  try:
    return __import__(name)
  except ImportError as e:
    raise ImportError(f"reading video files needs the optional package {name!r}: {EXTRA}") from e


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  path: str
  fps: float            # the stream's average frame rate
  width: int
  height: int
  num_frames: int       # as the container declares it (0 when it does not); `frames` counts
  duration_s: float
  start_s: float        # the first frame's time stamp
  has_audio: bool


def probe(path: str | os.PathLike) -> VideoInfo:
  """The first video stream's frame rate, size and length, and whether there is audio."""
  av = _import("av")
  path = os.fspath(path)
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError) as e:
    raise ValueError(f"{path}: not a readable video file ({e})") from e
  with container:
    if not container.streams.video:
      raise ValueError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
      raise ValueError(f"{path}: the video stream declares no frame rate")
    tb = float(stream.time_base) if stream.time_base else 0.0
    duration = (float(stream.duration * stream.time_base) if stream.duration
                else (container.duration or 0) / 1e6)
    start = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    return VideoInfo(path, float(rate), stream.codec_context.width, stream.codec_context.height,
                     int(stream.frames or 0), duration, start, bool(container.streams.audio))


def frames(path: str | os.PathLike) -> Iterator[tuple[int, float, np.ndarray]]:
  """(0-based index, time in seconds, RGB [H, W, 3] uint8) of every frame, in order."""
  av = _import("av")
  with av.open(os.fspath(path)) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for index, frame in enumerate(container.decode(stream)):
      time_s = float(frame.time) if frame.time is not None else float("nan")
      yield index, time_s, frame.to_ndarray(format="rgb24")


def decode_audio(path: str | os.PathLike, info: VideoInfo, rate: int = AUDIO_RATE) -> np.ndarray:
  """The first audio stream as float32 mono at `rate`, on the video's clock: sample 0 is at the
  first frame's time (audio that starts later is preceded by silence, earlier is cut).
  Empty when there is no audio stream."""
  av = _import("av")
  if not info.has_audio:
    return np.zeros(0, np.float32)
  chunks, first_s = [], None
  with av.open(os.fspath(path)) as container:
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    for frame in container.decode(stream):
      if first_s is None and frame.time is not None:
        first_s = float(frame.time)
      for out in resampler.resample(frame):
        chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
      chunks.append(out.to_ndarray().reshape(-1))
  samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
  offset = round(((first_s or 0.0) - info.start_s) * rate)  # audio start relative to frame 0
  if offset > 0:
    samples = np.concatenate([np.zeros(offset, np.float32), samples])
  elif offset < 0:
    samples = samples[-offset:]
  return samples


# ---- Faces ----


def _cascade(name: str):
  """(cv2, one of the Haar cascades opencv-python-headless 4.x ships)."""
  cv2 = _import("cv2")
  path = os.path.join(cv2.data.haarcascades, name)
  cascade = cv2.CascadeClassifier(path)
  if cascade.empty():
    raise FileNotFoundError(f"{path}: OpenCV's Haar cascade is missing (opencv-python-headless "
                            "5.x no longer ships them): pip install 'opencv-python-headless<5'")
  return cv2, cascade


class FaceDetector:
  """OpenCV's Haar frontal-face cascade (Viola-Jones), shipped inside opencv-python-headless:
  RGB frame -> boxes [N, 4] (x, y, w, h) in frame pixels, float32.

  Detects on a grey copy at most `detect_width` pixels wide (histogram-equalised), faces at
  least `min_face` of the frame's shorter side; `min_neighbors` overlapping hits make a face.
  """

  def __init__(self, detect_width: int = 640, min_face: float = 0.08, scale_factor: float = 1.1,
               min_neighbors: int = 5, cascade: str = "haarcascade_frontalface_default.xml"):
    self._cv2, self._cascade = _cascade(cascade)
    self.detect_width, self.min_face = int(detect_width), float(min_face)
    self.scale_factor, self.min_neighbors = float(scale_factor), int(min_neighbors)

  def __call__(self, rgb: np.ndarray) -> np.ndarray:
    cv2 = self._cv2
    h, w = rgb.shape[:2]
    scale = min(1.0, self.detect_width / w)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
      grey = cv2.resize(grey, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    side = max(16, round(self.min_face * min(grey.shape)))
    found = self._cascade.detectMultiScale(grey, scaleFactor=self.scale_factor,
                                           minNeighbors=self.min_neighbors, minSize=(side, side))
    return np.asarray(found, np.float32).reshape(-1, 4) / scale


class EyeFinder:
  """OpenCV's Haar eye cascade inside a face box: the roll of the face, the angle (radians,
  image coordinates: positive when the eye on the image's right sits lower) of the line
  through the centres of the largest eye found in each half of the box's upper part; NaN
  when either eye is not found or the angle is beyond `max_roll`."""

  def __init__(self, min_neighbors: int = 5, max_roll: float = 0.6,
               cascade: str = "haarcascade_eye.xml"):
    self._cv2, self._cascade = _cascade(cascade)
    self.min_neighbors, self.max_roll = int(min_neighbors), float(max_roll)

  def __call__(self, rgb: np.ndarray, box: np.ndarray) -> float:
    cv2 = self._cv2
    h, w = rgb.shape[:2]
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(box[0] + box[2]), w), min(int(box[1] + 0.6 * box[3]), h)
    if x1 - x0 < 16 or y1 - y0 < 8:
      return float("nan")
    grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(rgb[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY))
    side = float(box[2])
    found = np.asarray(self._cascade.detectMultiScale(
        grey, scaleFactor=1.1, minNeighbors=self.min_neighbors,
        minSize=(max(6, round(side / 8)),) * 2, maxSize=(round(side / 2.5),) * 2), float).reshape(-1, 4)
    centres = found[:, :2] + found[:, 2:] / 2 + (x0, y0)
    mid = box[0] + box[2] / 2
    halves = [found[:, 2] * (centres[:, 0] < mid), found[:, 2] * (centres[:, 0] >= mid)]
    if not all(half.max(initial=0) > 0 for half in halves):
      return float("nan")
    left, right = (centres[int(np.argmax(half))] for half in halves)
    roll = math.atan2(right[1] - left[1], right[0] - left[0])
    return roll if abs(roll) <= self.max_roll else float("nan")


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of (x, y, w, h) boxes, broadcast over leading axes."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  x0, y0 = np.maximum(a[..., 0], b[..., 0]), np.maximum(a[..., 1], b[..., 1])
  x1 = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2])
  y1 = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3])
  inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
  return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


@dataclasses.dataclass
class Track:
  boxes: np.ndarray     # [T, 4] (x, y, w, h) of the subject's face; NaN where there is none
  detected: np.ndarray  # [T] bool: the detector found it in this frame (else bridged or none)
  tracks: int           # how many people the detections formed (the subject is one)
  index: np.ndarray     # [T] int: which of the frame's detections is the subject's; -1: none

  @property
  def found(self) -> np.ndarray:
    return ~np.isnan(self.boxes[:, 0])


def _link(detections: Sequence[np.ndarray], max_gap: int, min_iou: float) -> list[dict[int, int]]:
  """Detections -> tracks {frame: index of the box in that frame's detections}: each box joins
  the track whose last box (seen at most max_gap + 1 frames ago) it overlaps most, at least
  `min_iou` (centres within a face's width count too: a fast head jumps between frames);
  otherwise it starts a track. One box per track per frame, larger boxes first."""
  tracks: list[dict[int, int]] = []
  last: list[tuple[int, np.ndarray]] = []
  for t, boxes in enumerate(detections):
    boxes = np.asarray(boxes).reshape(-1, 4)
    open_ = [i for i, (f, _) in enumerate(last) if t - f <= max_gap + 1]
    taken = set()
    for j in np.argsort(-boxes[:, 2] * boxes[:, 3], kind="stable"):
      box = boxes[j]
      best, best_score = None, 0.0
      for i in open_:
        if i in taken:
          continue
        prev = last[i][1]
        score = float(iou(box, prev))
        near = np.hypot(*(box[:2] + box[2:] / 2 - prev[:2] - prev[2:] / 2)) < prev[2]
        score = max(score, min_iou if near else 0.0)
        if score >= min_iou and score > best_score:
          best, best_score = i, score
      if best is None:
        tracks.append({})
        last.append((t, box))
        best = len(tracks) - 1
      tracks[best][t] = int(j)
      last[best] = (t, box)
      taken.add(best)
  return tracks


def _smooth(boxes: np.ndarray, window: int) -> np.ndarray:
  """Centred moving average of each coordinate over `window` frames, within each run of
  frames that have a value (never across a gap, NaN; shorter windows at a run's ends)."""
  if window <= 1:
    return boxes
  out = boxes.copy()
  found = ~np.isnan(boxes.reshape(len(boxes), -1)[:, 0])
  edges = np.flatnonzero(np.diff(np.concatenate([[0], found.astype(int), [0]])))
  half = window // 2
  for start, stop in zip(edges[::2], edges[1::2]):
    run = boxes[start:stop]
    csum = np.concatenate([np.zeros((1,) + run.shape[1:]), np.cumsum(run, 0)])
    idx = np.arange(len(run))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(run))
    out[start:stop] = (csum[hi] - csum[lo]) / (hi - lo).reshape((-1,) + (1,) * (run.ndim - 1))
  return out


def _subject(tracks: list[dict[int, int]], detections: Sequence[np.ndarray],
             min_track: int) -> list[dict[int, int]]:
  """The subject's tracks: of those with at least `min_track` detections, the set that never
  overlap in time with the largest summed box area (weighted interval scheduling). One
  person who leaves the picture and comes back is one chain of tracks; someone else in the
  picture at the same time is not in it."""
  tracks = sorted((tr for tr in tracks if len(tr) >= min_track), key=max)
  if not tracks:
    return []
  ends = [max(tr) for tr in tracks]
  area = lambda t, j: float(np.prod(np.asarray(detections[t]).reshape(-1, 4)[j, 2:]))  # noqa: E731
  weight = [sum(area(t, j) for t, j in tr.items()) for tr in tracks]
  best = [0.0] * (len(tracks) + 1)  # best[i]: of the first i tracks
  take = [False] * len(tracks)
  prev = []
  for i, tr in enumerate(tracks):
    p = int(np.searchsorted(ends, min(tr), side="left"))  # tracks ending before this starts
    prev.append(p)
    with_it = weight[i] + best[p]
    take[i] = with_it > best[i]
    best[i + 1] = max(with_it, best[i])
  chosen, i = [], len(tracks)
  while i > 0:
    if take[i - 1]:
      chosen.append(tracks[i - 1])
      i = prev[i - 1]
    else:
      i -= 1
  return chosen[::-1]


def follow_subject(detections: Sequence[np.ndarray], *, max_gap: int = 15, min_iou: float = 0.3,
                   min_track: int = 3, smooth: int = 5) -> Track:
  """One person's face box in every frame from per-frame detections ([N, 4] each).

  Detections are linked into tracks (`_link`), and the subject's are chosen by `_subject`
  (the person most present and nearest the camera, through absences). Gaps of at most
  `max_gap` frames (a missed detection, motion blur) are bridged by linear interpolation;
  longer ones, and frames before the first or after the last detection, have no face.
  Boxes are then smoothed over `smooth` frames (the cascade jitters by a few pixels from
  frame to frame)."""
  n = len(detections)
  tracks = _link(detections, max_gap, min_iou)
  boxes = np.full((n, 4), np.nan)
  index = np.full(n, -1)
  subject = {t: j for tr in _subject(tracks, detections, min_track) for t, j in tr.items()}
  if not subject:
    return Track(boxes, index >= 0, len(tracks), index)
  seen = np.array(sorted(subject))
  index[seen] = [subject[t] for t in seen]
  boxes[seen] = np.stack([np.asarray(detections[t]).reshape(-1, 4)[subject[t]] for t in seen])
  for a, b in zip(seen[:-1], seen[1:]):
    if 1 < b - a <= max_gap + 1:
      w = ((np.arange(a + 1, b) - a) / (b - a))[:, None]
      boxes[a + 1:b] = (1 - w) * boxes[a] + w * boxes[b]
  return Track(_smooth(boxes, smooth), index >= 0, len(tracks), index)


def crop_boxes(boxes: np.ndarray, scale: float = 1.1, shift: float = 0.0) -> np.ndarray:
  """Detector boxes [T, 4] -> square crop boxes [T, 4] (x, y, side, side): `scale` times the
  box's larger side, centred on the box's centre moved down by `shift` box heights. The
  defaults fit the training crops of affect-jax's synthetic faces, whose face fills the
  crop as Aff-Wild2's cropped_aligned faces do; `crop_scale` 1.2-1.3 suits faces photographed
  with forehead and chin inside the cascade's box."""
  boxes = np.asarray(boxes, np.float64)
  side = scale * np.maximum(boxes[:, 2], boxes[:, 3])
  cx = boxes[:, 0] + boxes[:, 2] / 2
  cy = boxes[:, 1] + boxes[:, 3] / 2 + shift * boxes[:, 3]
  return np.stack([cx - side / 2, cy - side / 2, side, side], 1)


def smooth_roll(rolls: np.ndarray, found: np.ndarray, window: int = 9) -> np.ndarray:
  """Per-frame rolls [T] (NaN where the eyes were not found) -> a roll for every frame with a
  face: within each run of such frames, the missing ones interpolated between their
  neighbours (the nearest at a run's ends; 0 for a run without any), then averaged over
  `window` frames. NaN where there is no face."""
  rolls = np.asarray(rolls, np.float64)
  out = np.full(len(rolls), np.nan)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(found, int), [0]])))
  for start, stop in zip(edges[::2], edges[1::2]):
    run = rolls[start:stop]
    known = np.flatnonzero(~np.isnan(run))
    out[start:stop] = (np.interp(np.arange(len(run)), known, run[known]) if len(known)
                       else 0.0)
  return _smooth(out, window)


def crop(rgb: np.ndarray, box: np.ndarray, size: int, roll: float = 0.0) -> np.ndarray:
  """The square `box` (x, y, side, side) of a frame, turned by -`roll` about its centre (so
  a face rolled by `roll` comes out level), resized to [size, size, 3] uint8 (area averaging
  when shrinking); what lies outside the frame is black, as in Aff-Wild2's crops."""
  cv2 = _import("cv2")
  if roll:
    # The square's circumscribed square, levelled, then its centre: no corner leaves it.
    side = float(box[2])
    big = math.ceil(side * math.sqrt(2)) + 2
    cx, cy = box[0] + side / 2, box[1] + side / 2
    region = crop(rgb, np.array([cx - big / 2, cy - big / 2, big, big]), big)
    turn = cv2.getRotationMatrix2D((big / 2, big / 2), math.degrees(roll), 1.0)
    level = cv2.warpAffine(region, turn, (big, big), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop(level, np.array([(big - side) / 2, (big - side) / 2, side, side]), size)
  h, w = rgb.shape[:2]
  x0, y0 = math.floor(box[0]), math.floor(box[1])
  side = max(1, round(box[2]))
  out = np.zeros((side, side, 3), np.uint8)
  sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
  interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
  return cv2.resize(out, (size, size), interpolation=interp)
