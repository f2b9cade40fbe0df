"""Atomic file writes: a reader, or a job resumed after a kill, sees the old file or the new
one, never a half-written one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
  """Calls `write(tmp)` on a temporary path beside `path`, then renames it over `path`.

  The temporary keeps `path`'s suffix, so savers that pick the format from the extension
  (matplotlib, PIL, np.save) write the right one. If `write` raises, the temporary is
  removed and `path` is left as it was. Creates the parent directory.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure_atomic(path: str | os.PathLike, dpi: int) -> None:
  """Saves matplotlib's current figure to `path` atomically and closes all figures."""
  import matplotlib.pyplot as plt
  try:
    atomic_write(path, lambda tmp: plt.savefig(tmp, dpi=dpi))
  finally:
    plt.close("all")
