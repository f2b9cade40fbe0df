"""Per-video feature store: one array per video plus the metadata that says what made it.

  <root>/store.json            kind, dim, dtype, model_hash, config (what every array shares)
  <root>/videos/<video>.npy    [num_frames, dim], read lazily with mmap (local stores)
  <root>/videos/<video>.json   num_frames, inputs, repaired_frames, ... (written last: its
                               presence marks the video complete)

Every file is written to a temporary name and renamed, so a crash mid-video leaves no
half-written array visible. A rerun skips the videos already complete whose `inputs` (a
fingerprint of the files they were made from) still match, and recomputes the rest. Videos are
independent files, so several hosts can fill one store without sharing a manifest file.
`root` may be a bucket URL (`gs://...`).
"""

from __future__ import annotations

import io
import json
import os

from etils import epath
import numpy as np

from affect_jax import fileio

STORE_FILE = "store.json"
VIDEOS_DIR = "videos"
FORMAT_VERSION = 1


def _write_json(path: epath.Path, obj) -> None:
  fileio.write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


class FeatureStore:
  """Open with `FeatureStore(root)` (existing) or `FeatureStore.create(...)`."""

  def __init__(self, root: str | os.PathLike):
    self.root = fileio.path(root)
    path = self.root / STORE_FILE
    if not path.is_file():
      raise FileNotFoundError(f"{path}: not a feature store (no {STORE_FILE})")
    self.info = json.loads(path.read_text())
    if self.info.get("format") != FORMAT_VERSION:
      raise ValueError(f"{path}: feature store format {self.info.get('format')}, "
                       f"expected {FORMAT_VERSION}")

  @classmethod
  def create(cls, root: str | os.PathLike, *, kind: str, dim: int, dtype: str,
             model_hash: str, config: dict | None = None) -> "FeatureStore":
    """Creates the store, or opens it when it exists with the same kind/dim/dtype/model.

    A store made by a different model (or dim/dtype) is an error, never silently mixed.
    """
    root = fileio.path(root)
    info = {"format": FORMAT_VERSION, "kind": kind, "dim": int(dim),
            "dtype": np.dtype(dtype).name, "model_hash": model_hash, "config": config or {}}
    path = root / STORE_FILE
    if path.is_file():
      old = json.loads(path.read_text())
      keys = ("format", "kind", "dim", "dtype", "model_hash")
      diff = {k: (old.get(k), info[k]) for k in keys if old.get(k) != info[k]}
      if diff:
        raise ValueError(f"{path}: existing store differs in {diff} (existing, requested); "
                         "use a new folder or delete it")
    else:
      (root / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
      _write_json(path, info)
    return cls(root)

  @property
  def dim(self) -> int:
    return int(self.info["dim"])

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.info["dtype"])

  def _array_path(self, video: str) -> epath.Path:
    return self.root / VIDEOS_DIR / f"{video}.npy"

  def _meta_path(self, video: str) -> epath.Path:
    return self.root / VIDEOS_DIR / f"{video}.json"

  def videos(self) -> list[str]:
    """Complete videos, sorted."""
    # iterdir, not glob: a root holding glob characters such as "[" must still match.
    try:
      files = list((self.root / VIDEOS_DIR).iterdir())
    except FileNotFoundError:  # A bucket has no empty folders: nothing written yet.
      return []
    return sorted(p.stem for p in files if p.suffix == ".json" and not p.name.startswith("."))

  def meta(self, video: str) -> dict:
    path = self._meta_path(video)
    if not path.is_file():
      raise KeyError(f"{self.root}: no features for video {video!r}")
    return json.loads(path.read_text())

  def has(self, video: str, num_frames: int | None = None, inputs: str | None = None) -> bool:
    """True when the video is complete and its array matches its metadata (and
    `num_frames` and the `inputs` fingerprint it was written with, when given): what a
    resumed extraction may skip."""
    try:
      meta = self.meta(video)
      arr = self._load(video, mmap=True)
    except (KeyError, FileNotFoundError, ValueError):
      return False
    ok = arr.shape == (meta["num_frames"], self.dim) and arr.dtype == self.dtype
    ok = ok and (inputs is None or meta.get("inputs") == inputs)
    return ok and (num_frames is None or meta["num_frames"] == num_frames)

  def plan(self, videos: dict[str, int], inputs: dict[str, str]) -> tuple[list[str], list[str]]:
    """(to compute, of them the ones complete but made from other inputs) among `videos`
    ({video: num_frames}), in their order."""
    todo = [v for v in videos if not self.has(v, videos[v], inputs[v])]
    return todo, [v for v in todo if self.has(v, videos[v])]

  def write(self, video: str, features: np.ndarray, **meta) -> None:
    """Stores [num_frames, dim] features (cast to the store dtype) and their metadata."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(f"{video}: features of shape {features.shape}, store dim is {self.dim}")
    if not np.isfinite(features).all():
      raise ValueError(f"{video}: non-finite features")
    arr = features.astype(self.dtype)
    fileio.atomic_write(self._array_path(video), lambda tmp: np.save(tmp, arr))
    _write_json(self._meta_path(video), {"num_frames": int(arr.shape[0]), **meta})

  def read(self, video: str, mmap: bool = True) -> np.ndarray:
    """[num_frames, dim]; memory-mapped (read-only) unless `mmap=False` or the store is
    remote (then read into memory)."""
    if not self._meta_path(video).is_file():
      raise KeyError(f"{self.root}: no features for video {video!r}")
    return self._load(video, mmap)

  def _load(self, video: str, mmap: bool) -> np.ndarray:
    path = self._array_path(video)
    if fileio.is_remote(path):
      return np.load(io.BytesIO(path.read_bytes()))
    return np.load(path, mmap_mode="r" if mmap else None)

  def manifest(self) -> dict:
    """store.json plus every complete video's metadata."""
    return {**self.info, "videos": {v: self.meta(v) for v in self.videos()}}
