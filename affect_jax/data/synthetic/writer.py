"""Writes the synthetic dataset in Aff-Wild2's layout, with its manifest and oracle.

Randomness: the plan (names, lengths, pairs, splits) comes from the seed alone; every
video draws from its own streams keyed by (seed, source index, subject, purpose), so one
video's content does not depend on any other's. A two-subject source gives videos
`<source>_left` and `<source>_right` (different people, own affect); their one audio track
`<source>.wav` follows the `_left` subject's affect.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import NamedTuple

import numpy as np

from affect_jax import metrics, tasks
from affect_jax.data.affwild2 import (
    AUDIO_DIR, FRAMES_DIR, TASK_DIRS, TASKS, TEST_LABELS_DIR, TEST_SET, TRAIN_SET,
    VALIDATION_SET, frame_name, task_test_list, write_annotation)
from affect_jax.fileio import write_text_atomic
from affect_jax.data import audio as audio_io
from affect_jax.data.synthetic import audio, dynamics, render

MANIFEST = "synthetic_manifest.json"
ORACLE = "oracle.json"
ALL_SPLITS = (TRAIN_SET, VALIDATION_SET, TEST_SET)
PAIR_SUFFIXES = ("_left", "_right")
_RESOLUTIONS = ("1280x720", "1920x1080", "640x360", "480x360", "854x480", "1080x1920")
# Random stream purposes, the last element of a stream key.
_AFFECT, _RENDER, _AUDIO, _ANNOTATE = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What `generate` writes. Fractions are of videos (splits, labels) or frames (the rest)."""
  num_videos: int = 30
  min_frames: int = 300
  max_frames: int = 900
  image_size: int = 112
  fps: float = 30.0
  seed: int = 0
  pair_fraction: float = 0.2        # videos that are _left/_right halves of a two-subject source
  label_fraction: float = 0.8       # videos each task labels, drawn per task within each split
  train_fraction: float = 0.6
  validation_fraction: float = 0.2  # the rest is the held-out test split
  missing_fraction: float = 0.02    # frames without an image
  occluded_fraction: float = 0.05   # frames with an occluder over the face
  blur_fraction: float = 0.06       # frames in strongly blurred runs
  invalid_fraction: float = 0.03    # frames an annotator marks invalid, per task
  min_event_s: float = 0.5          # shortest expression event

  def __post_init__(self):
    if not 1 <= self.min_frames <= self.max_frames:
      raise ValueError(f"need 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
    if self.num_videos < 1 or self.image_size < 8 or self.fps <= 0:
      raise ValueError(f"need num_videos >= 1, image_size >= 8, fps > 0: {self}")
    if not 0 <= self.train_fraction + self.validation_fraction <= 1:
      raise ValueError("train_fraction + validation_fraction must lie in [0, 1]")


class Source(NamedTuple):
  """One recording: one video, or a `_left`/`_right` pair sharing frames count and audio."""
  index: int
  name: str
  num_frames: int
  videos: tuple[str, ...]
  splits: dict  # task -> split, only the tasks that label this source


def _rng(seed: int, *key: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _split_counts(n: int, config: SyntheticConfig) -> tuple[int, int, int]:
  if n < 3:
    return n - (n == 2), int(n == 2), 0
  # A split with a share gets at least one source; one without none (train_fraction=0 and
  # validation_fraction=0: every video is a test video, e.g. a fresh draw to score on).
  test_fraction = 1 - config.train_fraction - config.validation_fraction
  val = max(1, round(n * config.validation_fraction)) if config.validation_fraction > 0 else 0
  test = max(1, round(n * test_fraction)) if test_fraction > 1e-9 else 0
  return n - val - test, val, test


def plan(config: SyntheticConfig) -> list[Source]:
  """Names, lengths, pairs and per-task splits of every source, from the seed alone."""
  rng = _rng(config.seed, 2**31)
  num_pairs = round(config.num_videos * config.pair_fraction / 2)
  if config.pair_fraction > 0 and config.num_videos >= 4:
    num_pairs = max(num_pairs, 1)
  n = config.num_videos - num_pairs
  ids = rng.choice(np.arange(1, 10 * n + 100), n, replace=False)
  names = [f"{i}-{rng.choice((24, 25, 30, 60))}-{rng.choice(_RESOLUTIONS)}" if rng.random() < 0.6
           else f"video{i}" for i in ids]
  frames = rng.integers(config.min_frames, config.max_frames + 1, n)
  paired = set(rng.choice(n, num_pairs, replace=False).tolist())
  order, bounds = rng.permutation(n), np.cumsum(_split_counts(n, config))
  split_of = {}
  for split, group in zip(ALL_SPLITS, np.split(order, bounds[:-1])):
    split_of.update({int(i): split for i in group})
  labelled = {i: [] for i in range(n)}
  for task in TASKS:
    for split in ALL_SPLITS:
      group = [i for i in range(n) if split_of[i] == split]
      if group:
        k = max(1, round(config.label_fraction * len(group)))
        for i in rng.choice(group, k, replace=False):
          labelled[int(i)].append(task)
  for i, its_tasks in labelled.items():  # every video serves at least one task
    if not its_tasks:
      its_tasks.append(TASKS[rng.integers(len(TASKS))])
  return [Source(i, names[i], int(frames[i]),
                 tuple(names[i] + s for s in PAIR_SUFFIXES) if i in paired else (names[i],),
                 {t: split_of[i] for t in TASKS if t in labelled[i]}) for i in range(n)]


def _owned_names() -> list[str]:
  names = [FRAMES_DIR, AUDIO_DIR, TEST_LABELS_DIR, ORACLE, MANIFEST]
  return names + [TASK_DIRS[t][0] for t in TASKS] + [task_test_list(t) for t in TASKS]


def _prepare(root: pathlib.Path) -> None:
  """Clears what an earlier run wrote; refuses a non-empty folder that holds no manifest."""
  if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
    raise FileExistsError(f"{root} is not empty and has no {MANIFEST}: not overwriting it")
  # The old manifest stays until the new one replaces it, so a crashed run can be rerun.
  for name in _owned_names():
    path = root / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists() and name != MANIFEST:
      path.unlink()
  root.mkdir(parents=True, exist_ok=True)


def _label_path(root: pathlib.Path, task: str, split: str, video: str) -> pathlib.Path:
  if split == TEST_SET:
    return root / TEST_LABELS_DIR / TASK_DIRS[task][0] / f"{video}.txt"
  return root / TASK_DIRS[task][0] / split / f"{video}.txt"


def _annotate(rng, task: str, affect: dynamics.Affect, config: SyntheticConfig):
  """(clean latent, written labels, number of invalid frames) of one video for one task."""
  n, fps = len(affect.va), config.fps
  invalid = dynamics.invalid_spans(rng, n, config.invalid_fraction, fps)
  annotators = {  # the synthetic annotator of each task: its clean latent, then the labels
      "VA": lambda: (affect.va, dynamics.annotate_va(rng, affect.va, fps, invalid)),
      "EXPR": lambda: (affect.expr, dynamics.annotate_expr(
          rng, affect.expr, fps, invalid, max(1, round(config.min_event_s * fps)))),
      "AU": lambda: ((affect.au > 0.5).astype(np.int64),
                     dynamics.annotate_au(rng, affect.au, fps, invalid)),
  }
  clean, labels = annotators[task]()
  return clean, labels, int(invalid.sum())


def _write_source(root: pathlib.Path, src: Source, config: SyntheticConfig, scored: dict) -> dict:
  """Writes one source's frames, audio and labels; returns its videos' manifest entries."""
  seed, n = config.seed, src.num_frames
  affects = [dynamics.simulate_affect(_rng(seed, src.index, s, _AFFECT), n, config.fps, config.min_event_s)
             for s in range(len(src.videos))]
  track = audio.synthesize(_rng(seed, src.index, 0, _AUDIO), affects[0], config.fps)
  audio_io.write_wav(root / AUDIO_DIR / f"{src.name}.wav", track)
  entries = {}
  for s, (video, affect) in enumerate(zip(src.videos, affects)):
    rng = _rng(seed, src.index, s, _RENDER)
    identity = render.sample_identity(rng)
    nuisance = render.sample_nuisance(
        rng, n, config.fps, config.missing_fraction, config.occluded_fraction, config.blur_fraction,
        # The first two sources always have these gaps, so every dataset exercises them.
        missing_start=(rng.random() < 0.2) | (src.index == 0),
        missing_middle=(rng.random() < 0.3) | (src.index == 1))
    frame_dir = root / FRAMES_DIR / video
    frame_dir.mkdir(parents=True, exist_ok=True)
    for k, jpeg in render.render_video(rng, identity, affect.au, affect.blink, nuisance, config.image_size):
      (frame_dir / frame_name(k)).write_bytes(jpeg)
    present = ~nuisance.missing
    labelled_by = {}
    for task, split in src.splits.items():
      annotator = _rng(seed, src.index, s, _ANNOTATE + TASKS.index(task))
      clean, label, invalid = _annotate(annotator, task, affect, config)
      write_annotation(_label_path(root, task, split, video), task, label)
      scored[task][split].append((clean, label))
      labelled_by[task] = {"split": split, "valid": n - invalid, "invalid": invalid}
    entries[video] = {
        "num_frames": n, "source_video": src.name,
        "missing_frames": (np.flatnonzero(nuisance.missing) + 1).tolist(),
        "occluded_frames": sum(o is not None for o, p in zip(nuisance.occluder, present) if p),
        "tasks": labelled_by}
  return entries


def oracle_scores(scored: dict) -> dict:
  """Task metric of the clean latent against the written labels, per task and split."""
  out = {}
  for task in TASKS:
    out[task] = {}
    width = tasks.get(task).label_shape
    for split in ALL_SPLITS:
      clean = np.concatenate([c for c, _ in scored[task][split]] or [np.zeros((0, *width))])
      label = np.concatenate([lab for _, lab in scored[task][split]] or [np.zeros((0, *width))])
      out[task][split] = metrics.task_scores(task, clean, label)
  return out


def _totals(videos: dict) -> dict:
  totals = {t: {s: {"videos": 0, "frames": 0, "valid": 0, "invalid": 0} for s in ALL_SPLITS} for t in TASKS}
  for entry in videos.values():
    for task, info in entry["tasks"].items():
      row = totals[task][info["split"]]
      row["videos"] += 1
      row["frames"] += entry["num_frames"]
      row["valid"] += info["valid"]
      row["invalid"] += info["invalid"]
  return totals


def _to_json(obj) -> str:
  return json.dumps(obj, indent=1) + "\n"


def generate(out_dir: str | os.PathLike, config: SyntheticConfig = SyntheticConfig()) -> dict:
  """Writes the dataset under out_dir and returns the manifest dict (also written as JSON)."""
  root = pathlib.Path(out_dir)
  _prepare(root)
  scored = {t: {s: [] for s in ALL_SPLITS} for t in TASKS}  # (clean, label) per video
  videos = {}
  sources = plan(config)
  for src in sources:
    videos.update(_write_source(root, src, config, scored))
  for task in TASKS:
    for split in (TRAIN_SET, VALIDATION_SET):  # the layout has both folders, even a split without videos
      (root / TASK_DIRS[task][0] / split).mkdir(parents=True, exist_ok=True)
    test = sorted(v for src in sources if src.splits.get(task) == TEST_SET for v in src.videos)
    write_text_atomic(root / task_test_list(task), "".join(v + "\n" for v in test))
  manifest = {"config": dataclasses.asdict(config), "videos": dict(sorted(videos.items())),
              "totals": _totals(videos)}
  write_text_atomic(root / ORACLE, _to_json(oracle_scores(scored)))
  write_text_atomic(root / MANIFEST, _to_json(manifest))
  return manifest


def summarize(out_dir: str | os.PathLike) -> str:
  """A few readable lines about a written dataset: splits, frames, nuisance, oracle, size."""
  root = pathlib.Path(out_dir)
  manifest = json.loads((root / MANIFEST).read_text())
  oracle = json.loads((root / ORACLE).read_text())
  videos = manifest["videos"].values()
  frames = sum(v["num_frames"] for v in videos)
  missing = sum(len(v["missing_frames"]) for v in videos)
  occluded = sum(v["occluded_frames"] for v in videos)
  size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
  lines = [f"{root}: {len(manifest['videos'])} videos, {frames} frames, {missing} missing, "
           f"{occluded} occluded, {size / 2**20:.1f} MiB"]
  for task in TASKS:
    for split in ALL_SPLITS:
      t = manifest["totals"][task][split]
      score = oracle[task][split]
      score = score[tasks.get(task).main_metric]
      lines.append(f"  {task:4s} {split:14s} {t['videos']:3d} videos {t['frames']:6d} frames "
                   f"{t['invalid']:5d} invalid  oracle {score:.3f}")
  return "\n".join(lines)
