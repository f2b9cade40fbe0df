"""A synthetic subject filmed as a video file (H.264 + AAC in an MP4): what
`launch/analyze_video.py` takes, with the truth it should recover.

One person (the videos' renderer, camera-free) moves about a larger scene while their latent
affect drives the face and the speech-like audio; for a stretch in the middle they leave
the picture. The truth (`<name>.json`): every frame's face square in frame pixels (null while
away), valence/arousal, expression and AU intensities.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import pathlib

import numpy as np

from affect_jax.data.affwild2 import AUDIO_RATE
from affect_jax.data.synthetic import audio, dynamics, render
from affect_jax.fileio import atomic_write, write_text_atomic


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  num_frames: int = 240
  fps: float = 30.0
  width: int = 320
  height: int = 240
  face_size: int = 112         # side of the face square in frame pixels
  away: tuple[float, float] = (0.4, 0.6)   # the share of the clip the subject is out of picture
  seed: int = 2

  def __post_init__(self):
    if self.num_frames < 1 or self.fps <= 0 or self.face_size < 16:
      raise ValueError(f"need num_frames >= 1, fps > 0, face_size >= 16: {self}")
    if self.face_size > min(self.width, self.height) or self.width % 2 or self.height % 2:
      raise ValueError(f"need an even frame size at least the face's: {self}")


def _path(rng, config: ClipConfig) -> np.ndarray:
  """[T, 2] top-left corners of the face square: a slow drift over the scene."""
  t = np.arange(config.num_frames) / config.fps
  phase = rng.uniform(0, 2 * np.pi, 2)
  room = np.array([config.width, config.height]) - config.face_size
  centre = 0.5 + 0.45 * np.stack([np.sin(0.35 * t + phase[0]), np.sin(0.5 * t + phase[1])], 1)
  return np.round(centre * room).astype(int)


def render_frames(config: ClipConfig):
  """(RGB frames [T, H, W, 3] uint8, face squares [T, 4] float (NaN while away), affect,
  int16 audio)."""
  stream = lambda purpose: np.random.default_rng([config.seed, purpose])  # noqa: E731
  n = config.num_frames
  identity = render.sample_identity(stream(0))  # the same person at any clip length
  affect = dynamics.simulate_affect(stream(1), n, config.fps)
  bg = render.background(identity, 2 * config.face_size)
  scene = np.empty((config.height, config.width, 3), np.uint8)
  scene[:] = stream(2).integers(40, 200, 3, dtype=np.uint8)
  corners = _path(stream(3), config)
  away = np.zeros(n, bool)
  away[round(config.away[0] * n):round(config.away[1] * n)] = True
  frames = np.repeat(scene[None], n, 0)
  boxes = np.full((n, 4), np.nan)
  s = config.face_size
  for t in np.flatnonzero(~away):
    face = render.render_face(identity, affect.au[t], s, render.NEUTRAL_POSE, affect.blink[t], bg=bg)
    x, y = corners[t]
    frames[t, y:y + s, x:x + s] = np.asarray(face)
    boxes[t] = (x, y, s, s)
  track = audio.synthesize(stream(4), affect, config.fps)
  return frames, boxes, affect, track


def encode_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float,
               samples: np.ndarray | None = None, rate: int = AUDIO_RATE) -> None:
  """Frames [T, H, W, 3] uint8 as H.264 (and int16 mono `samples` as AAC) in an MP4, written
  atomically through PyAV."""
  import av

  def write(tmp):
    with av.open(str(tmp), "w", format="mp4") as out:
      vs = out.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
      vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
      vs.options = {"crf": "18", "preset": "veryfast"}
      aus = None
      if samples is not None and len(samples):
        aus = out.add_stream("aac", rate=rate)
        aus.layout = "mono"
      for img in frames:
        out.mux(vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
      out.mux(vs.encode(None))
      if aus is not None:
        pcm = np.asarray(samples, np.int16)
        for start in range(0, len(pcm), 1024):
          chunk = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="s16", layout="mono")
          chunk.sample_rate, chunk.pts = rate, start
          out.mux(aus.encode(chunk))
        out.mux(aus.encode(None))
  atomic_write(path, write)


def write_clip(out_dir: str | os.PathLike, config: ClipConfig = ClipConfig(),
               name: str = "synthetic_clip") -> pathlib.Path:
  """Writes `<name>.mp4` and its truth `<name>.json` under out_dir; returns the MP4's path."""
  frames, boxes, affect, track = render_frames(config)
  out = pathlib.Path(out_dir)
  path = out / f"{name}.mp4"
  encode_mp4(path, frames, config.fps, track)
  truth = {"config": dataclasses.asdict(config),
           "face_boxes": [None if np.isnan(b[0]) else [float(v) for v in b] for b in boxes],
           "valence_arousal": np.round(affect.va, 4).tolist(),
           "expression": affect.expr.tolist(),
           "au_intensity": np.round(affect.au, 4).tolist()}
  write_text_atomic(out / f"{name}.json", json.dumps(truth))
  return path
