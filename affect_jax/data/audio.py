"""Audio features on the video frame clock: exactly one vector per video frame.

Frame k's image is shown at t = k / fps; its feature describes the sound around that instant,
from windows centred on it. A video of T frames gets T rows however long its audio is
(outside the track is silence), and nothing drifts: every window is placed from its own
time, never by accumulating a hop.

  logmel          log mel power, Welch-averaged over the frame's span          [n_mels]
  mfcc            DCT-II (orthonormal) of that log-mel, first n_mfcc, c0 kept  [n_mfcc]
  logmel+prosody  log-mel + log RMS, zero-crossing rate, f0 / f0_max,
                  voicing strength (PROSODY_NAMES)                             [n_mels + 4]

The spectrum: 25 ms periodic-Hann windows (n_fft 512 at 16 kHz), a whole number n_sub of
them spread evenly over each video frame's span (1 / fps) and centred on its time, n_sub
picked so their spacing is near `hop_s` (30 fps: 3 windows 11.1 ms apart; 25 fps: 4 windows
10 ms apart). The frame's mel power is the mean of theirs (Welch's estimate of the spectrum
over the frame), then log(power + log_floor). Log of the mean rather than mean of the logs:
one silent sub-window would otherwise drag a voiced frame towards the floor. Power is
|rfft(x w)|^2 / sum(w)^2, so a full-scale sine reads 1/4 in its bin whatever the window.
No pre-emphasis and no per-video normalisation: standardising is the model's business.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import wave
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft, signal

from affect_jax.data import affwild2
from affect_jax.data.affwild2 import AUDIO_RATE
from affect_jax.fileio import atomic_write

KINDS = ("logmel", "mfcc", "logmel+prosody")
PROSODY_NAMES = ("log_rms", "zcr", "f0", "voicing")
_CHUNK_FRAMES = 2048  # video frames per block: bounds memory on hour-long videos


@dataclasses.dataclass(frozen=True)
class AudioFeatureConfig:
  """What `frame_features` computes; `dataclasses.asdict` of it can ride in a config/store."""
  kind: str = "logmel"
  n_mels: int = 64
  n_mfcc: int = 20
  win_s: float = 0.025           # analysis window (Hann); also the pitch reference window
  hop_s: float = 0.010           # target spacing of the windows inside one video frame
  n_fft: int | None = None       # None: the next power of two >= the window
  fmin: float = 0.0
  fmax: float | None = None      # None: Nyquist
  slaney_norm: bool = False      # unit-area triangles (librosa's norm="slaney") instead of peak 1
  log_floor: float = 1e-10       # added before every log: -100 dB, below 16-bit noise in a band
  f0_min: float = 60.0
  f0_max: float = 400.0
  voicing_threshold: float = 0.5  # normalised cross-correlation needed to call a frame voiced

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown audio feature kind {self.kind!r}; expected one of {KINDS}")
    if self.n_mels < 1 or not 1 <= self.n_mfcc <= self.n_mels:
      raise ValueError(f"need n_mels >= 1 and 1 <= n_mfcc <= n_mels, got {self.n_mels}, {self.n_mfcc}")
    if self.win_s <= 0 or self.hop_s <= 0 or not 0 < self.f0_min < self.f0_max:
      raise ValueError(f"need win_s, hop_s > 0 and 0 < f0_min < f0_max: {self}")

  @property
  def dim(self) -> int:
    """D, the width of a frame's feature vector."""
    return {"logmel": self.n_mels, "mfcc": self.n_mfcc,
            "logmel+prosody": self.n_mels + len(PROSODY_NAMES)}[self.kind]


# ---- Reading and resampling ----


def read_wav(path) -> tuple[np.ndarray, int]:
  """(float32 [N] mono, sample rate) of a PCM (8/16/24/32-bit) or float WAV; channels averaged.

  PCM maps to [-1, 1) (8-bit is unsigned, centred on 128); float samples come as stored.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such WAV file")
  try:
    with wave.open(str(path), "rb") as f:
      tag, channels, width, rate = 1, f.getnchannels(), f.getsampwidth(), f.getframerate()
      raw = f.readframes(f.getnframes())
  except wave.Error:  # Python 3.11's wave reads plain PCM only: float/extensible come here
    tag, channels, width, rate, raw = _read_riff(path)
  except (EOFError, struct.error) as e:
    raise ValueError(f"{path}: not a readable WAV file "
                     f"({str(e) or 'empty or truncated header'})") from None
  return _decode(path, raw, tag, width, channels), int(rate)


def write_wav(path, samples: np.ndarray, rate: int = AUDIO_RATE) -> None:
  """Mono 16-bit PCM, atomically: int16 samples as they are, float ones in [-1, 1] scaled
  (and clipped) to int16."""
  x = np.asarray(samples).reshape(-1)
  if x.dtype != np.int16:
    x = np.round(np.clip(x.astype(np.float64), -1.0, 32767 / 32768) * 32768).astype(np.int16)

  def write(tmp):
    with wave.open(str(tmp), "wb") as f:
      f.setnchannels(1)
      f.setsampwidth(2)
      f.setframerate(int(rate))
      f.writeframes(x.astype("<i2").tobytes())
  atomic_write(path, write)


def _read_riff(path: Path) -> tuple[int, int, int, int, bytes]:
  """(format tag, channels, bytes per sample, rate, data) from the RIFF chunks."""
  data = path.read_bytes()
  if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    raise ValueError(f"{path}: not a WAV file (no RIFF/WAVE header)")
  fmt, pos = None, 12
  while pos + 8 <= len(data):
    cid, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
    body = data[pos + 8:pos + 8 + size]
    if cid == b"fmt " and len(body) >= 16:
      tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
      if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag leads the GUID
        tag = struct.unpack("<H", body[24:26])[0]
      fmt = (tag, channels, bits // 8, rate)
    elif cid == b"data" and fmt is not None:
      return (*fmt, body)
    pos += 8 + size + (size & 1)  # chunks are padded to even sizes
  raise ValueError(f"{path}: not a readable WAV file (no fmt/data chunk)")


def _decode(path: Path, raw: bytes, tag: int, width: int, channels: int) -> np.ndarray:
  if channels < 1 or width < 1:
    raise ValueError(f"{path}: WAV header claims {channels} channels of {8 * width}-bit samples")
  raw = raw[: len(raw) // (width * channels) * width * channels]  # drop a truncated last frame
  if tag == 3 and width in (4, 8):
    return _mono(np.frombuffer(raw, f"<f{width}").astype(np.float32), channels, 1.0)
  if tag == 1 and width == 1:
    return _mono(np.frombuffer(raw, np.uint8).astype(np.float32) - 128, channels, 1 / 128)
  if tag == 1 and width in (2, 4):
    return _mono(np.frombuffer(raw, f"<i{width}").astype(np.float32), channels, 1 / 2.0 ** (8 * width - 1))
  if tag == 1 and width == 3:
    b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
    v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    return _mono((v - ((v & 0x800000) << 1)).astype(np.float32), channels, 1 / 2.0**23)  # sign-extend
  raise ValueError(f"{path}: unsupported WAV encoding (format tag {tag}, {8 * width}-bit); "
                   "expected 8/16/24/32-bit PCM or 32/64-bit float")


def _mono(x: np.ndarray, channels: int, scale: float) -> np.ndarray:
  """Channel mean of interleaved samples, times scale (in place: tracks can be large)."""
  if channels > 1:
    x = sum(x[c::channels] for c in range(channels))
  x *= np.float32(scale / channels)
  return x


def resample(x: np.ndarray, rate_in: int, rate_out: int = AUDIO_RATE) -> np.ndarray:
  """float32 [ceil(N * rate_out / rate_in)], polyphase with the reduced integer ratio."""
  if int(rate_in) != rate_in or int(rate_out) != rate_out or min(rate_in, rate_out) <= 0:
    raise ValueError(f"sample rates must be positive integers, got {rate_in}, {rate_out}")
  x = np.asarray(x, np.float32)
  if rate_in == rate_out:
    return x
  g = math.gcd(int(rate_in), int(rate_out))
  return signal.resample_poly(x, int(rate_out) // g, int(rate_in) // g).astype(np.float32)


# ---- Mel scale and the frame clock ----


def hz_to_mel(f):
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None, slaney_norm: bool = False) -> np.ndarray:
  """float32 [n_fft // 2 + 1, n_mels] triangles on the HTK mel scale (2595 log10(1 + f/700)).

  n_mels + 2 points evenly spaced in mel over [fmin, fmax]; band i rises linearly in Hz from
  point i to 1 at point i+1 (its centre) and falls to 0 at point i+2. With `slaney_norm` each
  triangle is scaled by 2 / (its width in Hz), i.e. unit area, as librosa's norm="slaney".
  """
  fmax = sample_rate / 2 if fmax is None else fmax
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f"need 0 <= fmin < fmax <= {sample_rate / 2}, got {fmin}, {fmax}")
  points = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  left, centre, right = points[:-2], points[1:-1], points[2:]
  freqs = np.arange(n_fft // 2 + 1)[:, None] * (sample_rate / n_fft)
  weights = np.maximum(0.0, np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)))
  if slaney_norm:
    weights *= 2.0 / (right - left)
  return weights.astype(np.float32)


def frame_centres(num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
  """int64 [T]: the sample at frame k's time k / fps, rounded half up."""
  return _sub_centres(np.arange(num_frames), fps, sample_rate, 1)


def _sub_centres(frames: np.ndarray, fps: float, sample_rate: int, n_sub: int) -> np.ndarray:
  """int64 [len(frames) * n_sub]: n_sub window centres evenly tiling each frame's span,
  centred on its time (n_sub = 1: the frame time itself)."""
  m = frames[:, None] * n_sub + np.arange(n_sub) + 0.5 - n_sub / 2  # in units of 1 / (fps n_sub)
  return np.floor(m.reshape(-1) * sample_rate / (fps * n_sub) + 0.5).astype(np.int64)


def _windows(x: np.ndarray, centres: np.ndarray, length: int) -> np.ndarray:
  """[M, length]: samples centres - length // 2 ... + length - 1, zeros outside x."""
  starts = centres - length // 2
  lo = max(0, -int(starts.min()))
  hi = max(0, int(starts.max()) + length - x.size)
  return sliding_window_view(np.pad(x, (lo, hi)), length)[starts + lo]


# ---- Features ----


def _pitch(x: np.ndarray, centres: np.ndarray, sample_rate: int, cfg: AudioFeatureConfig):
  """f0 in Hz [T] (0 when unvoiced) and voicing strength [T] in [0, 1].

  Normalised cross-correlation (as RAPT) of a win_s reference with the signal lagged by
  sample_rate/f0_max ... sample_rate/f0_min, over a span centred on the frame time: a
  periodic signal scores 1 at its period, noise about 1/sqrt(window). The first local peak
  within 10 % of the best one is the period (so 2x, 3x the period lose), refined by a parabola.
  """
  length = int(round(cfg.win_s * sample_rate))
  lag_min, lag_max = int(sample_rate // cfg.f0_max), int(math.ceil(sample_rate / cfg.f0_min))
  if lag_min < 2:
    raise ValueError(f"f0_max {cfg.f0_max} Hz is too high for {sample_rate} Hz audio")
  seg = _windows(x, centres, length + lag_max + 1).astype(np.float64)
  n = 1 << (seg.shape[1] - 1).bit_length()  # no wrap-around for lags 0..lag_max+1
  corr = fft.irfft(np.conj(fft.rfft(seg[:, :length], n)) * fft.rfft(seg, n), n)[:, :lag_max + 2]
  energy = np.concatenate([np.zeros((len(seg), 1)), np.cumsum(seg**2, axis=1)], axis=1)
  lags = np.arange(lag_max + 2)
  lagged = energy[:, length + lags] - energy[:, lags]
  r = corr / np.sqrt(np.maximum(energy[:, length:length + 1] * lagged, 1e-20))
  prev, mid, nxt = r[:, lag_min - 1:lag_max], r[:, lag_min:lag_max + 1], r[:, lag_min + 1:lag_max + 2]
  peak = (mid >= prev) & (mid > nxt)
  best = np.where(peak, mid, -np.inf).max(axis=1, initial=-np.inf)
  pick = peak & (mid >= best[:, None] - 0.1 * np.abs(best[:, None]))
  i, rows = np.argmax(pick, axis=1), np.arange(len(r))
  a, b, c = prev[rows, i], mid[rows, i], nxt[rows, i]
  curve = a - 2 * b + c  # < 0 at a real peak; the parabola's vertex refines the lag
  bent = curve < -1e-12
  shift = np.clip(np.where(bent, 0.5 * (a - c) / np.where(bent, curve, -1.0), 0.0), -0.5, 0.5)
  strength = np.where(pick.any(axis=1), np.clip(b, 0, 1), 0.0)
  voiced = strength >= cfg.voicing_threshold
  return np.where(voiced, sample_rate / (lag_min + i + shift), 0.0), strength


def _block(x, sample_rate, frames: np.ndarray, fps, cfg, n_sub, win, bank) -> np.ndarray:
  """float32 [len(frames), D] for the video frames `frames`."""
  raw = _windows(x, _sub_centres(frames, fps, sample_rate, n_sub), len(win))
  power = fft.rfft(raw * win, cfg.n_fft)
  power = (power.real**2 + power.imag**2) / win.sum() ** 2
  mel = (power @ bank).reshape(len(frames), n_sub, -1).mean(axis=1)
  logmel = np.log(mel + cfg.log_floor)
  if cfg.kind == "mfcc":
    return fft.dct(logmel, type=2, norm="ortho", axis=-1)[:, :cfg.n_mfcc]
  if cfg.kind == "logmel":
    return logmel
  mean_square = ((raw * win) ** 2).sum(axis=1) / (win**2).sum()
  log_rms = 0.5 * np.log(mean_square.reshape(len(frames), n_sub).mean(axis=1) + cfg.log_floor)
  crossings = (np.signbit(raw[:, 1:]) != np.signbit(raw[:, :-1])).mean(axis=1)
  zcr = crossings.reshape(len(frames), n_sub).mean(axis=1)
  f0, strength = _pitch(x, _sub_centres(frames, fps, sample_rate, 1), sample_rate, cfg)
  return np.concatenate([logmel, np.stack([log_rms, zcr, f0 / cfg.f0_max, strength], axis=1)], axis=1)


def frame_features(samples: np.ndarray, sample_rate: int, num_frames: int, fps: float,
                   config: AudioFeatureConfig | None = None, **overrides) -> np.ndarray:
  """float32 [num_frames, config.dim]: row k describes the audio around t = k / fps.

  samples: [N] mono at any sample_rate (window lengths are in seconds).

  `overrides` replace fields of `config` (default AudioFeatureConfig()), e.g. kind="mfcc".
  """
  cfg = dataclasses.replace(config or AudioFeatureConfig(), **overrides)
  x = np.asarray(samples, np.float32).reshape(-1)
  if fps <= 0 or sample_rate <= 0:
    raise ValueError(f"need fps > 0 and sample_rate > 0, got {fps}, {sample_rate}")
  if num_frames <= 0:
    return np.zeros((0, cfg.dim), np.float32)
  n_sub = max(1, round(1 / (fps * cfg.hop_s)))
  length = int(round(cfg.win_s * sample_rate))
  win = signal.get_window("hann", length).astype(np.float32)  # periodic: its peak sits on the centre
  n_fft = cfg.n_fft or 1 << (length - 1).bit_length()
  if n_fft < length:
    raise ValueError(f"n_fft {n_fft} is shorter than the {length}-sample window")
  cfg = dataclasses.replace(cfg, n_fft=n_fft)
  bank = mel_filterbank(sample_rate, n_fft, cfg.n_mels, cfg.fmin, cfg.fmax, cfg.slaney_norm)
  starts = range(0, num_frames, _CHUNK_FRAMES)
  blocks = [_block(x, sample_rate, np.arange(s, min(s + _CHUNK_FRAMES, num_frames)), fps, cfg, n_sub,
                   win, bank) for s in starts]
  return np.concatenate(blocks).astype(np.float32)


def video_audio_features(root, video: str, num_frames: int, fps: float,
                         config: AudioFeatureConfig | None = None, **overrides
                         ) -> tuple[np.ndarray, int]:
  """(float32 [num_frames, D], frames without audio) from the video's source WAV (shared by
  `_left`/`_right`) at 16 kHz. A frame is without audio when its time k / fps is at or past
  the track's end: its row describes silence, and the caller decides what that means."""
  path = affwild2.audio_path(root, video)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no audio track for video {video!r}")
  x, rate = read_wav(path)
  x = resample(x, rate, AUDIO_RATE)
  silent = int((frame_centres(num_frames, fps, AUDIO_RATE) >= x.size).sum())
  return frame_features(x, AUDIO_RATE, num_frames, fps, config, **overrides), silent


# ---- Features computed elsewhere (e.g. a speech model) ----


def align_external(features: np.ndarray, hop_s: float, num_frames: int, fps: float,
                   offset_s: float = 0.0) -> np.ndarray:
  """float32 [num_frames, D] from [M, D] features at times offset_s + i * hop_s.

  Linear interpolation in time at t = k / fps; frames before the first / after the last
  feature take that feature.
  """
  f = np.asarray(features)
  if f.ndim != 2 or f.shape[0] == 0 or hop_s <= 0:
    raise ValueError(f"need a non-empty [M, D] array and hop_s > 0, got shape {f.shape}, hop {hop_s}")
  pos = np.clip((np.arange(num_frames) / fps - offset_s) / hop_s, 0, f.shape[0] - 1)
  i = np.minimum(np.floor(pos).astype(np.int64), max(f.shape[0] - 2, 0))
  w = (pos - i)[:, None]
  upper = f[np.minimum(i + 1, f.shape[0] - 1)].astype(np.float64)
  return (f[i].astype(np.float64) * (1 - w) + upper * w).astype(np.float32)


def load_external(folder, video: str) -> np.ndarray:
  """[M, D] from `<folder>/<video>.npy`, else `<folder>/<source video>.npy` for `_left`/`_right`."""
  folder = Path(folder)
  tried = [folder / f"{video}.npy"]
  if affwild2.source_video(video) != video:
    tried.append(folder / f"{affwild2.source_video(video)}.npy")
  for path in tried:
    if path.is_file():
      try:
        a = np.load(path, allow_pickle=False)
      except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
      if a.ndim != 2:
        raise ValueError(f"{path}: expected a [time, dim] array, got shape {a.shape}")
      return a
  raise FileNotFoundError(f"no external features for video {video!r}: tried "
                          + ", ".join(str(p) for p in tried))
