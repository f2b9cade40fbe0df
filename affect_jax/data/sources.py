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

import functools
import os
from typing import Sequence

import ml_collections

from affect_jax.data import affwild2, faces

SOURCES = ("folders", "tfds")


def source(config: ml_collections.ConfigDict) -> str:
  kind = config.data.get("source", "folders")
  if kind not in SOURCES:
    raise ValueError(f"config.data.source: unknown {kind!r} (folders | tfds)")
  return kind


@functools.lru_cache(maxsize=8)
def _frames(directory: str):
  from affect_jax.data import tfds_builders
  return tfds_builders.FramesDataset(directory)


def frames_dataset(config: ml_collections.ConfigDict):
  """The aff_wild2_frames dataset of a 'tfds' config (`tfds_builders.FramesDataset`), or None
  for 'folders'."""
  if source(config) == "folders":
    return None
  if not config.data.get("tfds_dir"):
    raise ValueError("config.data.source='tfds' needs config.data.tfds_dir: an aff_wild2_frames "
                     "dataset directory written by launch/build_tfds.py")
  return _frames(str(config.data.tfds_dir))


def face_roots(config: ml_collections.ConfigDict) -> list[str]:
  """Pretraining's roots: `data.roots` (comma-separated), else Aff-Wild2's own frames."""
  if config.data.roots:
    return [r for r in config.data.roots.split(",") if r]
  if source(config) == "tfds":
    frames_dataset(config)  # checks tfds_dir is set
    return [str(config.data.tfds_dir)]
  return [os.path.join(config.data.root, affwild2.FRAMES_DIR)]


def face_items(config: ml_collections.ConfigDict) -> Sequence:
  """Pretraining's images: paths (folders) or `tfds_builders.Records` (tfds)."""
  roots = face_roots(config)
  if source(config) == "tfds":
    from affect_jax.data import tfds_builders
    return tfds_builders.face_records(roots)
  return faces.index_roots(roots, cache_dir=os.path.expanduser(config.data.index_cache))
