"""Face-image collections for self-supervised pretraining: any folder trees of jpg/png.

The index (sorted relative paths per root) is built once and cached as a text file; the
cache key covers the root and the modification times of its immediate sub-folders, so
adding a video folder or frames to one invalidates it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from absl import logging

from affect_jax import fileio

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
DEFAULT_CACHE_DIR = os.path.expanduser("~/.cache/affect_jax/face_index")


def _walk_images(root: Path) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    rel = os.path.relpath(dirpath, root)
    for name in sorted(filenames):
      if name.lower().endswith(IMAGE_EXTS):
        out.append(name if rel == "." else os.path.join(rel, name))
  return out


def _cache_key(root: Path) -> str:
  h = hashlib.sha1(str(root).encode())
  h.update(str(root.stat().st_mtime_ns).encode())
  with os.scandir(root) as it:
    for e in sorted(it, key=lambda e: e.name):
      if e.is_dir():
        h.update(f"{e.name}:{e.stat().st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def index_images(root: str | os.PathLike, cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR) -> list[str]:
  """Absolute paths of all images under `root`, sorted; cached under `cache_dir`."""
  root = Path(root).resolve()
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: face image root is not a folder")
  cache = None
  if cache_dir is not None:
    cache = fileio.path(cache_dir) / f"{root.name}-{_cache_key(root)}.txt"
    if cache.is_file():
      rel = cache.read_text().splitlines()
      return [str(root / r) for r in rel]
  rel = _walk_images(root)
  if not rel:
    raise FileNotFoundError(f"{root}: no {'/'.join(IMAGE_EXTS)} images found")
  if cache is not None:
    fileio.write_text_atomic(cache, "\n".join(rel) + "\n")
  logging.info("indexed %d images under %s", len(rel), root)
  return [str(root / r) for r in rel]


def index_roots(roots: Sequence[str | os.PathLike] | str,
                cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR) -> list[str]:
  """Images of several roots mixed (concatenated; the loader shuffles). A string may hold
  several roots separated by commas (convenient on the command line)."""
  if isinstance(roots, (str, os.PathLike)):
    roots = [r for r in str(roots).split(",") if r]
  paths: list[str] = []
  for r in roots:
    paths += index_images(r, cache_dir)
  return paths
