"""Host settings that must be in place when the process starts: huge pages for malloc.

XLA:CPU allocates an executable's temporary buffers afresh at every call (1.4 GiB for the
ViT-B/16 MAE train step at batch 8) and frees them at its end. glibc serves blocks that large
with `mmap`, so every step faults in and zeroes the whole arena again in 4 KiB pages: 375,000
page faults and 0.5-0.9 s of kernel time per 1.6 s step on a 2-core machine (measured with
`getrusage`). With the glibc tunable `glibc.malloc.hugetlb=1` malloc asks the kernel for
transparent huge pages (`madvise`) for those blocks: about 1,000 faults per step and a 17%
faster step there, and no change to any result.

Tunables are read once, when glibc starts, so a launcher that wants them re-executes itself
with the variable set, before it does anything else (`use_huge_pages()` at its `__main__`
guard; `os.execv` keeps the process id, so schedulers and multi-host launchers see one
process). It does nothing where it cannot help: not Linux/glibc >= 2.35, transparent huge
pages off or already on for every mapping, or the tunable already chosen by the user.
`AFFECT_JAX_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "AFFECT_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (not glibc, not Linux)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def huge_page_tunables(environ, *, glibc: tuple[int, int] | None, thp: str | None) -> str | None:
  """The GLIBC_TUNABLES value to restart with, or None when a restart would not help.

  Only the 'madvise' THP mode needs it: under 'always' the kernel already backs large
  mappings with huge pages, under 'never' it will not. A tunables string the user set is kept
  and extended, unless it already decides `glibc.malloc.hugetlb` itself.
  """
  if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < (2, 35) or thp != "madvise":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if any(item.split("=")[0] == TUNABLE for item in current.split(":") if item):
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def use_huge_pages() -> None:
  """Re-executes this process with glibc's huge-page tunable when it helps (see module doc).

  Call it first thing in a launcher's `__main__` block. Returns (without restarting) when
  nothing is to be gained or the restart fails.
  """
  tunables = huge_page_tunables(os.environ, glibc=glibc_version(), thp=thp_mode())
  if tunables is None:
    return
  previous = os.environ.get("GLIBC_TUNABLES")
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, sys.orig_argv)
  except OSError:  # carry on unchanged, environment included
    if previous is None:
      del os.environ["GLIBC_TUNABLES"]
    else:
      os.environ["GLIBC_TUNABLES"] = previous
