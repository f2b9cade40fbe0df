"""Paths that may be local or in a bucket (`gs://`, `s3://`), and atomic writes: a reader,
or a job resumed after a kill, sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import re
import tempfile
from typing import Callable
import uuid

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_remote(p: str | os.PathLike) -> bool:
  """True for `scheme://...` paths (buckets), False for local ones."""
  return bool(_URL.match(os.fspath(p)))


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`: URLs unchanged, local paths `~`-expanded and made absolute."""
  p = os.fspath(p)
  if is_remote(p):
    try:
      return epath.Path(p)
    except KeyError:
      raise ValueError(f"{p}: unsupported URL scheme (epath knows gs://, s3://, az://, "
                       "hf://)") from None
  return epath.Path(os.path.abspath(os.path.expanduser(p)))


_path = path  # The functions below take an argument named `path`.


def _tmp_name(target: epath.Path) -> epath.Path:
  # Unique across hosts and processes: several hosts may write into one shared folder.
  return target.with_name(f".{target.stem}.tmp{uuid.uuid4().hex}{target.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
  """Calls `write(tmp)` on a local temporary file, then puts it in place of `path`.

  Locally the temporary sits beside `path` and is renamed over it; for a URL it is a local
  file copied to a temporary beside `path`, which is then renamed over it. The temporary
  keeps `path`'s suffix, so savers that pick the format from the extension (matplotlib,
  PIL, np.save) write the right one. If anything raises, the temporaries are removed and
  `path` is left as it was. Creates the parent directory.
  """
  target = _path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(target):
    tmp = Path(_tmp_name(target))
    try:
      write(tmp)
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
    return
  with tempfile.TemporaryDirectory() as local_dir:
    local = Path(local_dir) / target.name
    write(local)
    remote_tmp = _tmp_name(target)
    try:
      epath.Path(local).copy(remote_tmp)
      remote_tmp.replace(target)
    except BaseException:
      remote_tmp.unlink(missing_ok=True)
      raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure_atomic(path: str | os.PathLike, dpi: int) -> None:
  """Saves matplotlib's current figure to `path` atomically and closes all figures."""
  import matplotlib.pyplot as plt
  try:
    atomic_write(path, lambda tmp: plt.savefig(tmp, dpi=dpi))
  finally:
    plt.close("all")


def write_shared_text(path: str | os.PathLike, text: str) -> None:
  """A file every process of a job shares (results, manifests): process 0 writes it
  atomically, and every process returns once it is there."""
  import jax
  from affect_jax import sharding
  if jax.process_index() == 0:
    write_text_atomic(path, text)
  sharding.barrier(f"write {path}")


def stat_fingerprint(paths, root: str | os.PathLike | None = None) -> str:
  """A short hash of the files' names (relative to `root`), sizes and modification times:
  what a rerun compares to tell changed inputs from unchanged ones without reading them (a
  missing file counts too). Local files only."""
  h = hashlib.sha256()
  for p in paths:
    p = os.fspath(p)
    try:
      st = os.stat(p)
      h.update(f"{os.path.relpath(p, root) if root else p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except FileNotFoundError:
      h.update(f"{os.path.relpath(p, root) if root else p}\0missing\n".encode())
  return h.hexdigest()[:16]
