"""Splits and folds (the authors' 5-fold scheme) over an Aff-Wild2 tree, and its summary."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import logging

from affect_jax.data.affwild2.formats import (
    MAX_UNMATCHED_FRAMES, SPLITS, TASKS, TEST_SET, TRAIN_SET, VALIDATION_SET)
from affect_jax.data.affwild2.layout import (
    list_videos, load_split, load_video, source_video, task_dir)

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
