"""Speech-like audio whose loudness, syllable rate and pitch follow the speaker's affect.

A harmonic voice (pitch contour, spectral tilt) is gated by the speaker's turns and
syllables (the same syllable phase that opens the rendered mouth), with consonant noise
bursts, and sits on background noise and mains hum. Aroused speech is louder, faster,
higher and brighter; valence lifts the pitch a little.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

from affect_jax.data.affwild2 import AUDIO_RATE
from affect_jax.data.synthetic.dynamics import Affect, ou


def num_samples(num_frames: int, fps: float, rate: int = AUDIO_RATE) -> int:
  """Samples in a track as long as the video (num_frames / fps seconds)."""
  return int(round(num_frames * rate / fps))


def synthesize(rng: np.random.Generator, affect: Affect, fps: float, rate: int = AUDIO_RATE) -> np.ndarray:
  """[num_samples] int16 mono track for one speaker's latent affect."""
  num_frames = len(affect.va)
  n = num_samples(num_frames, fps, rate)
  frame_pos = np.arange(n) * (fps / rate)  # fractional frame index of each sample
  at_sample = lambda x: np.interp(frame_pos, np.arange(num_frames), x)  # noqa: E731
  valence, arousal = at_sample(affect.va[:, 0]), (at_sample(affect.va[:, 1]) + 1) / 2
  smooth = np.exp(-1 / (0.03 * rate))  # 30 ms ramps at turn boundaries
  talk = signal.lfilter([1 - smooth], [1, -smooth], at_sample(affect.talk))
  syllable = at_sample(affect.syllable_phase)

  f0 = rng.uniform(95, 230) * 2 ** (0.45 * arousal + 0.1 * valence + 0.08 * np.sin(syllable / 3)
                                    + 0.02 * ou(rng, n, 0.05 * rate))
  phase = 2 * np.pi * np.cumsum(f0) / rate
  tilt = 1.8 - 0.8 * arousal  # aroused voices carry more energy in the upper harmonics
  voice = sum(np.exp(-tilt * np.log(k)) * np.sin(k * phase) for k in range(1, 9))
  envelope = talk * np.maximum(np.sin(syllable), 0) ** 1.5 * (0.12 + 0.4 * arousal)
  consonant = np.maximum(np.cos(syllable), 0) ** 8 * talk * (0.03 + 0.05 * arousal)
  hiss = np.diff(rng.standard_normal(n + 1))  # first difference: a high-passed noise

  pink = signal.lfilter([1.0], [1.0, -0.97], rng.standard_normal(n)) * 0.17
  hum_freq = rng.choice([50.0, 60.0])
  background = rng.uniform(0.005, 0.03) * pink + rng.uniform(0, 0.01) * np.sin(
      2 * np.pi * hum_freq * np.arange(n) / rate)
  wave = envelope * voice + consonant * hiss + background
  return (np.clip(wave, -1, 1) * 32767).astype(np.int16)
