"""Host settings that must be in place when the process starts: huge pages for malloc, and
XLA:CPU's multi-output fusion. `configure()` at a launcher's `__main__` guard applies both,
and only to a CPU-only run (`cpu_only`: `JAX_PLATFORMS` names only the CPU, or no GPU/TPU
plugin is installed, decided before jax starts); the restart never under a multi-process
launcher (`multi_process`), which expects the process it started to stay as it is.

XLA:CPU allocates an executable's temporary buffers afresh at every call and frees them at
its end. glibc serves blocks that large with `mmap`, so every step faults in and zeroes the
whole arena again in 4 KiB pages, a large share of a step's time in the kernel. With the
glibc tunable `glibc.malloc.hugetlb=1` malloc asks the kernel for transparent huge pages
(`madvise`) for those blocks, which cuts the faults by orders of magnitude and changes no
result. (The zeroing stays; `config.steps_per_call` > 1 pays it once per several steps.)

Tunables are read once, when glibc starts, so a launcher that wants them re-executes itself
with the variable set, before it does anything else (`use_huge_pages()` at its `__main__`
guard; `os.execv` keeps the process id, so schedulers and multi-host launchers see one
process). It does nothing where it cannot help: not Linux/glibc >= 2.35, transparent huge
pages off or already on for every mapping, or the tunable already chosen by the user.
`AFFECT_JAX_HUGE_PAGES=0` turns it off.

XLA:CPU leaves multi-output fusion off unless `--xla_backend_extra_options` names
`xla_cpu_use_multi_output_fusion`. Without it every loop fusion writes one array; with it
sibling loops (ones that read the same operands, or independent ones of the same shape) run
as one loop with several outputs: in the MAE train step Adam's first moment is computed in
the pass that squares the gradient, and the parameter updates of same-shaped weights (the
encoder's fc1 kernels, say) share one loop, so fewer passes over memory. Other backends
ignore it (XLA hands LLVM only the extra options not named `xla_*`, and no GPU or TPU pass
reads this one). XLA reads XLA_FLAGS once, when jax creates its first backend, so
`use_xla_cpu_options()` sets it before any computation. A user's own
`--xla_backend_extra_options` is left alone; `AFFECT_JAX_XLA_CPU_OPTIONS=0` turns it off.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "AFFECT_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
XLA_CPU_OPTIONS = "xla_cpu_use_multi_output_fusion"
XLA_OPT_OUT = "AFFECT_JAX_XLA_CPU_OPTIONS"


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


def xla_flags(environ) -> str | None:
  """The XLA_FLAGS value with XLA:CPU's options (see module doc), or None to leave it as is.

  Existing flags are kept. `--xla_backend_extra_options` holds a single list, so when the user
  has set it their list stands unchanged.
  """
  if environ.get(XLA_OPT_OUT, "1") == "0":
    return None
  current = environ.get("XLA_FLAGS", "").strip()
  if "--xla_backend_extra_options" in current:
    return None
  option = f"--xla_backend_extra_options={XLA_CPU_OPTIONS}"
  return f"{current} {option}" if current else option


def use_xla_cpu_options() -> None:
  """Sets XLA_FLAGS to `xla_flags(os.environ)` when that adds something.

  It takes effect only if jax has not created a backend yet in this process (XLA parses the
  variable once): call it before the first computation, device query or compile.
  """
  flags = xla_flags(os.environ)
  if flags is not None:
    os.environ["XLA_FLAGS"] = flags


# Distributions that give jax a GPU or TPU backend.
ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt",
                        "jax-cuda13-pjrt", "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu",
                        "libtpu-nightly")


def accelerator_plugins() -> list[str]:
  """The installed packages (or `jax_plugins` modules) that give jax a GPU/TPU backend."""
  found = []
  for name in ACCELERATOR_PACKAGES:
    try:
      importlib.metadata.version(name)
      found.append(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  try:
    found += [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
  except Exception:  # noqa: BLE001 - unreadable metadata: decide from the packages alone
    pass
  if importlib.util.find_spec("libtpu") is not None and "libtpu" not in found:
    found.append("libtpu")
  return sorted(set(found))


def cpu_only(environ, plugins) -> bool:
  """True when this run will compute on the CPU: `JAX_PLATFORMS` names only 'cpu', or it is
  unset and no accelerator plugin is installed."""
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return set(platforms) == {"cpu"}
  return not plugins


def multi_process(environ, argv) -> bool:
  """True under a launcher that starts several processes of one job (SLURM, Open MPI,
  torchrun-style WORLD_SIZE, jax's own variables, or `--num_processes` > 1)."""
  def count(name):
    try:
      return int(environ.get(name, "0"))
    except ValueError:
      return 0
  if any(count(n) > 1 for n in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                "WORLD_SIZE", "JAX_NUM_PROCESSES")):
    return True
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else (
        argv[i + 1] if arg == "--num_processes" and i + 1 < len(argv) else None)
    if value is not None and value.isdigit() and int(value) > 1:
      return True
  return False


def configure() -> None:
  """A launcher's process setup, first thing at its `__main__` guard: on a CPU-only run
  XLA:CPU's options, then (in a single process) the huge-page restart, which carries the
  environment over. On GPU/TPU hosts it does nothing."""
  if not cpu_only(os.environ, accelerator_plugins()):
    return
  use_xla_cpu_options()
  if not multi_process(os.environ, sys.argv[1:]):
    use_huge_pages()
