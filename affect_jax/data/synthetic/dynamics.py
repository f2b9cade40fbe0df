"""Latent affect of one subject, and the annotators who label it.

Valence/arousal drift slowly (sum of Ornstein-Uhlenbeck processes plus sparse bursts);
the expression follows the region of VA space with hysteresis and a minimum duration; AU
intensities follow FACS prototypes of the expression, smoothed in time, plus spontaneous
activity (speech drives AU25/AU26, spurts of AU7, brow flashes). Annotators see this
clean latent with a lag, noise and invalid spans.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import signal

from affect_jax.data.affwild2 import AU_NAMES, EXPR_NAMES, INVALID_AU, INVALID_EXPR, INVALID_VA

_AU = {name: i for i, name in enumerate(AU_NAMES)}
_EX = {name: i for i, name in enumerate(EXPR_NAMES)}

# FACS prototypes: expression -> {AU: weight}; weights < 1 are the optional units.
_PROTOTYPES = {
    "Neutral": {},
    "Anger": {"AU4": 1.0, "AU7": 0.9, "AU23": 0.8, "AU24": 0.7},
    "Disgust": {"AU4": 0.8, "AU7": 0.6, "AU10": 1.0, "AU15": 0.5},
    "Fear": {"AU1": 1.0, "AU2": 0.8, "AU4": 0.8, "AU7": 0.6, "AU25": 1.0, "AU26": 0.6},
    "Happiness": {"AU6": 0.9, "AU12": 1.0, "AU25": 0.6},
    "Sadness": {"AU1": 1.0, "AU4": 0.8, "AU15": 1.0},
    "Surprise": {"AU1": 1.0, "AU2": 1.0, "AU25": 1.0, "AU26": 1.0},
    "Other": {"AU10": 0.6, "AU24": 0.5},
}
EXPR_PROTOTYPES = np.zeros((len(EXPR_NAMES), len(AU_NAMES)), np.float32)  # [8, 12]
for _name, _units in _PROTOTYPES.items():
  for _unit, _weight in _units.items():
    EXPR_PROTOTYPES[_EX[_name], _AU[_unit]] = _weight

# Where each expression lives in (valence, arousal); Other is inserted, never scored.
_VA_CENTRES = {
    "Neutral": (0.0, 0.0), "Anger": (-0.6, 0.55), "Disgust": (-0.55, 0.15),
    "Fear": (-0.45, 0.85), "Happiness": (0.55, 0.35), "Sadness": (-0.5, -0.45),
    "Surprise": (0.15, 0.75),
}
# Annotators mix up these neighbours; every class has one.
_CONFUSABLE = {
    "Neutral": "Other", "Anger": "Disgust", "Disgust": "Anger", "Fear": "Surprise",
    "Happiness": "Neutral", "Sadness": "Neutral", "Surprise": "Fear", "Other": "Neutral",
}
_CONFUSE = np.array([_EX[_CONFUSABLE[name]] for name in EXPR_NAMES])


class Affect(NamedTuple):
  """Clean latent state of one subject, one entry per frame."""
  va: np.ndarray              # [T, 2] float32 in (-1, 1)
  expr: np.ndarray            # [T] int, index into EXPR_NAMES
  au: np.ndarray              # [T, 12] float32 intensity in [0, 1]
  blink: np.ndarray           # [T] eyelid closure in [0, 1] (not an AU, a nuisance)
  talk: np.ndarray            # [T] 0/1 speaking turns
  syllable_phase: np.ndarray  # [T] radians; syllables open the mouth and voice the audio


def ou(rng: np.random.Generator, n: int, tau: float, shape: tuple = ()) -> np.ndarray:
  """Stationary unit-variance Ornstein-Uhlenbeck process, time constant tau in samples; [n, *shape]."""
  a = np.exp(-1.0 / max(tau, 1e-3))
  eps = rng.standard_normal((n, *shape))
  zi = a * rng.standard_normal((1, *shape))
  x, _ = signal.lfilter([np.sqrt(1 - a * a)], [1.0, -a], eps, axis=0, zi=zi)
  return x


def runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Run-length encoding of a 1-D array: (starts, lengths)."""
  change = np.flatnonzero(np.diff(x) != 0) + 1
  starts = np.concatenate([[0], change])
  return starts, np.diff(np.concatenate([starts, [len(x)]]))


def enforce_min_duration(labels: np.ndarray, min_len: int) -> np.ndarray:
  """Merges runs shorter than min_len into their longer neighbour, shortest first."""
  labels = labels.copy()
  while True:
    starts, lengths = runs(labels)
    short = np.flatnonzero(lengths < min_len)
    if len(starts) == 1 or short.size == 0:
      return labels
    i = short[np.argmin(lengths[short])]
    left = lengths[i - 1] if i > 0 else -1
    right = lengths[i + 1] if i + 1 < len(starts) else -1
    donor = starts[i - 1] if left >= right else starts[i + 1]
    labels[starts[i]:starts[i] + lengths[i]] = labels[donor]


def _bursts(rng, n: int, rate: float, dur: tuple[float, float]) -> np.ndarray:
  """[n] 0/1 mask of Poisson-placed segments; rate per sample, durations in samples."""
  mask = np.zeros(n, np.float32)
  for start in np.flatnonzero(rng.random(n) < rate):
    mask[start:start + int(rng.uniform(*dur))] = 1.0
  return mask


def _latent_va(rng, n: int, fps: float) -> np.ndarray:
  """[n, 2] smooth valence/arousal: slow OU mixture + sparse surprise-like bursts."""
  offset = np.array([rng.normal(0.1, 0.35), rng.normal(0.2, 0.3)])
  x = offset + sum(s * ou(rng, n, t * fps, (2,)) for s, t in ((0.2, 0.8), (0.4, 4.0), (0.5, 15.0)))
  # Bursts: fast rise (~0.3 s), slow decay (~2 s) in arousal, a valence kick of either sign.
  kicks = (rng.random(n) < 1 / (20 * fps)) * rng.uniform(0.6, 1.2, n)
  rise, decay = np.exp(-1 / (0.3 * fps)), np.exp(-1 / (2.0 * fps))
  burst = signal.lfilter([1 - rise], [1, -rise], signal.lfilter([1 - decay], [1, -decay], kicks))
  burst *= 1 / ((1 - rise) * (1 - decay)) * 0.12
  x[:, 1] += burst
  x[:, 0] += burst * rng.choice([-1.0, 1.0])
  return np.tanh(x).astype(np.float32)


def _expression(rng, va: np.ndarray, fps: float, min_len: int) -> np.ndarray:
  """[n] expression with hysteresis and a minimum duration, from the VA region."""
  n = len(va)
  names = list(_VA_CENTRES)
  centres = np.array([_VA_CENTRES[k] for k in names])  # [7, 2]
  score = -np.sum((va[:, None, :] - centres) ** 2, -1) / (2 * 0.3**2)  # [n, 7]
  score += rng.normal(0, 0.5, len(names)) + 0.6 * ou(rng, n, 2.0 * fps, (len(names),))
  score[:, 0] += 1.0  # the neutral basin is wide
  current, out = int(np.argmax(score[0])), np.empty(n, np.int64)
  for t in range(n):
    best = int(np.argmax(score[t]))
    if score[t, best] - score[t, current] > 1.0:
      current = best
    out[t] = current
  expr = np.array([_EX[k] for k in names])[out]
  for _ in range(rng.binomial(2, 0.3)):  # the occasional "Other"
    start, length = rng.integers(0, n), int(rng.uniform(1.0, 3.0) * fps)
    expr[start:start + length] = _EX["Other"]
  return enforce_min_duration(expr, min_len)


def _smooth_onsets(target: np.ndarray, fps: float) -> np.ndarray:
  """First-order follower with a faster onset (0.12 s) than offset (0.3 s); [n, k]."""
  up, down = 1 - np.exp(-1 / (0.12 * fps)), 1 - np.exp(-1 / (0.3 * fps))
  out, state = np.empty_like(target), target[0].copy()
  for t in range(len(target)):
    diff = target[t] - state
    state += np.where(diff > 0, up, down) * diff
    out[t] = state
  return out


def _speech(rng, arousal: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
  """Speaking turns (more talk when aroused) and the syllable phase, both [n]."""
  n = len(arousal)
  a01 = (arousal + 1) / 2
  p_on = (0.5 + a01) / (2.5 * fps)
  p_off = np.full(n, 1 / (3.0 * fps))
  u, talk, state = rng.random(n), np.empty(n, np.float32), rng.random() < 0.5
  for t in range(n):
    state = (u[t] >= p_off[t]) if state else (u[t] < p_on[t])
    talk[t] = state
  rate = 3.0 + 3.0 * a01 + 0.5 * ou(rng, n, 0.5 * fps)  # syllables per second
  return talk, 2 * np.pi * np.cumsum(np.maximum(rate, 1.0)) / fps


def simulate_affect(rng: np.random.Generator, num_frames: int, fps: float,
                    min_event_s: float = 0.5) -> Affect:
  """Draws one subject's latent affect for num_frames frames at fps."""
  n = num_frames
  va = _latent_va(rng, n, fps)
  expr = _expression(rng, va, fps, max(1, round(min_event_s * fps)))
  expressiveness = rng.uniform(0.7, 1.25)
  strength = np.clip(expressiveness * (0.45 + 0.9 * np.linalg.norm(va, axis=1)), 0, 1.1)
  target = EXPR_PROTOTYPES[expr] * strength[:, None]  # [n, 12]
  spont = np.zeros_like(target)
  spont[:, _AU["AU7"]] = _bursts(rng, n, 1 / (15 * fps), (0.5 * fps, 2 * fps)) * rng.uniform(0.6, 0.9)
  talk, phase = _speech(rng, va[:, 1], fps)
  flash = _bursts(rng, n, talk / (6 * fps), (0.3 * fps, 0.8 * fps)) * 0.8
  spont[:, _AU["AU1"]] += flash
  spont[:, _AU["AU2"]] += flash
  spont[:, _AU["AU12"]] += _bursts(rng, n, (va[:, 0] > 0.2) / (10 * fps), (0.5 * fps, 2 * fps)) * 0.7
  au = _smooth_onsets(np.maximum(target, spont), fps) + 0.08 * ou(rng, n, 0.5 * fps, (12,))
  # Talking: lips part for the turn, the jaw follows each syllable, wider when aroused.
  syllable = np.maximum(np.sin(phase), 0) * talk
  au[:, _AU["AU25"]] += 0.55 * talk * (0.6 + 0.4 * syllable)
  au[:, _AU["AU26"]] += syllable * (0.2 + 0.6 * (va[:, 1] + 1) / 2)
  blink = np.zeros(n, np.float32)
  profile = np.array([0.5, 1.0, 1.0, 0.5])
  for start in np.flatnonzero(rng.random(n) < 0.3 / fps):
    seg = blink[start:start + len(profile)]
    blink[start:start + len(profile)] = np.maximum(seg, profile[:len(seg)])
  return Affect(va, expr, np.clip(au, 0, 1).astype(np.float32), blink, talk, phase)


# ---- Annotators ----


def invalid_spans(rng, n: int, fraction: float, fps: float) -> np.ndarray:
  """[n] bool: contiguous runs (0.3-2 s) covering about `fraction` of the frames, some videos none."""
  mask = np.zeros(n, bool)
  if fraction <= 0 or rng.random() < 0.3:
    return mask
  target = rng.uniform(0.5, 2.0) * fraction * n
  while mask.sum() < target:
    length = min(int(rng.uniform(0.3, 2.0) * fps), int(np.ceil(target - mask.sum())))
    start = rng.integers(0, max(1, n - length))
    mask[start:start + length] = True
  return mask


def _lag(x: np.ndarray, lag: int) -> np.ndarray:
  """x delayed by lag frames (annotators react late), holding the first value."""
  return np.concatenate([np.repeat(x[:1], lag, 0), x[:len(x) - lag]]) if lag else x


def _draw_lag(rng, fps: float) -> int:
  return int(rng.integers(round(0.1 * fps), round(0.33 * fps) + 1))


def annotate_va(rng, va: np.ndarray, fps: float, invalid: np.ndarray) -> np.ndarray:
  """[n, 2] labels: lagged latent with gain, smooth noise; 3 decimals; INVALID_VA rows."""
  n = len(va)
  label = _lag(va, _draw_lag(rng, fps)) * rng.uniform(0.85, 1.1, 2) + rng.normal(0, 0.03, 2)
  label += 0.08 * ou(rng, n, 0.7 * fps, (2,)) + rng.normal(0, 0.01, (n, 2))
  label = np.round(np.clip(label, -1, 1), 3) + 0.0  # + 0.0 turns -0.0 into 0.0
  label[invalid] = INVALID_VA
  return label


def annotate_expr(rng, expr: np.ndarray, fps: float, invalid: np.ndarray, min_len: int) -> np.ndarray:
  """[n] labels: lagged latent class, boundaries shifted and some segments confused."""
  label = _lag(expr, _draw_lag(rng, fps)).copy()
  starts, lengths = runs(label)
  ends = starts + lengths
  # Move each boundary by up to 0.15 s, keeping every segment at least min_len long.
  shift = round(0.15 * fps)
  bounds = list(starts)
  for i in range(1, len(bounds)):
    lo = max(bounds[i - 1] + min_len, starts[i] - shift) if lengths[i - 1] >= min_len else starts[i]
    hi = min(ends[i] - min_len, starts[i] + shift) if lengths[i] >= min_len else starts[i]
    bounds[i] = int(rng.integers(lo, hi + 1)) if lo <= hi else starts[i]
  values = label[starts]
  confused = rng.random(len(values)) < 0.08
  values = np.where(confused, _CONFUSE[values], values)
  out = np.repeat(values, np.diff(np.concatenate([bounds, [len(label)]])))
  out[invalid] = INVALID_EXPR
  return out


def annotate_au(rng, au: np.ndarray, fps: float, invalid: np.ndarray) -> np.ndarray:
  """[n, 12] 0/1: lagged noisy intensity > 0.5, plus short flipped runs."""
  n = len(au)
  noisy = _lag(au, _draw_lag(rng, fps)) + 0.06 * ou(rng, n, 0.3 * fps, (au.shape[1],))
  label = (noisy > 0.5).astype(np.int64)
  for k in range(au.shape[1]):
    flips = _bursts(rng, n, 0.003, (2, 9)).astype(bool)
    label[flips, k] = 1 - label[flips, k]
  label[invalid] = INVALID_AU
  return label
