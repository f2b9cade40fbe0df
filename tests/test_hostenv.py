"""The launchers' process setup: the huge-page restart (when it applies, and that the restarted
process has it) and XLA:CPU's multi-output fusion (that it reaches the compiler)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from affect_jax import hostenv

MADVISE = dict(glibc=(2, 36), thp="madvise")


def test_tunables_added_where_they_help():
  assert hostenv.huge_page_tunables({}, **MADVISE) == "glibc.malloc.hugetlb=1"
  # The user's own tunables are kept, the huge-page one appended.
  env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert (hostenv.huge_page_tunables(env, **MADVISE)
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")


@pytest.mark.parametrize("env, glibc, thp", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),  # the user decided
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"}, (2, 36), "madvise"),
    ({hostenv.OPT_OUT: "0"}, (2, 36), "madvise"),
    ({}, (2, 34), "madvise"),  # glibc without the tunable
    ({}, None, "madvise"),  # not glibc
    ({}, (2, 36), "always"),  # the kernel already uses huge pages for large mappings
    ({}, (2, 36), "never"),
    ({}, (2, 36), None),
])
def test_no_restart_where_it_cannot_help(env, glibc, thp):
  assert hostenv.huge_page_tunables(env, glibc=glibc, thp=thp) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hostenv.thp_mode(str(path)) == "madvise"
  assert hostenv.thp_mode(str(tmp_path / "missing")) is None


_CHILD = textwrap.dedent("""
    import ctypes, json, os, resource, sys
    from affect_jax import hostenv
    print("started", flush=True)
    hostenv.use_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 * 2**20  # one large block, which glibc serves with mmap (numpy would madvise)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(size), 1, size)  # touch every page
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps([os.environ.get("GLIBC_TUNABLES", ""), faults, sys.argv[1:]]), flush=True)
""")


def _run_child(tmp_path, **env):
  script = tmp_path / "child.py"
  script.write_text(_CHILD)
  out = subprocess.run([sys.executable, "-u", str(script), "--flag=1", "x"], check=True,
                       capture_output=True, text=True, env={**os.environ, **env}).stdout
  lines = out.splitlines()
  return lines, *json.loads(lines[-1])


def test_restart_applies_the_tunable(tmp_path):
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if hostenv.huge_page_tunables(environ, glibc=hostenv.glibc_version(),
                                thp=hostenv.thp_mode()) is None:
    pytest.skip("this host gains nothing from the restart (glibc / THP mode)")
  base = {"GLIBC_TUNABLES": "", hostenv.OPT_OUT: "1"}
  lines, tunables, faults_huge, argv = _run_child(tmp_path, **base)
  # Restarted once, with the same arguments, and glibc took the tunable.
  assert lines.count("started") == 2
  assert tunables == "glibc.malloc.hugetlb=1"
  assert argv == ["--flag=1", "x"]
  lines, tunables, faults_small, _ = _run_child(tmp_path, **{**base, hostenv.OPT_OUT: "0"})
  assert lines.count("started") == 1 and tunables == ""
  # 256 MiB in 4 KiB pages is 65,536 faults; in 2 MiB pages about 128.
  assert faults_small > 60_000
  assert faults_huge < faults_small / 4


@pytest.mark.parametrize("before", [None, "glibc.malloc.arena_max=2"])
def test_failed_restart_leaves_the_environment_as_it_was(monkeypatch, before):
  if before is None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  else:
    monkeypatch.setenv("GLIBC_TUNABLES", before)
  monkeypatch.delenv(hostenv.OPT_OUT, raising=False)
  monkeypatch.setattr(hostenv, "glibc_version", lambda: (2, 36))
  monkeypatch.setattr(hostenv, "thp_mode", lambda: "madvise")
  tried = []

  def failing_execv(path, argv):
    tried.append(os.environ["GLIBC_TUNABLES"])
    raise OSError("exec refused")

  monkeypatch.setattr(hostenv.os, "execv", failing_execv)
  hostenv.use_huge_pages()
  assert tried == [hostenv.huge_page_tunables({"GLIBC_TUNABLES": before or ""}, **MADVISE)]
  assert os.environ.get("GLIBC_TUNABLES") == before


OPTION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


@pytest.mark.parametrize("env, expected", [
    ({}, OPTION),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
     "--xla_force_host_platform_device_count=8 " + OPTION),  # the user's flags kept
    ({"XLA_FLAGS": "--xla_backend_extra_options=xla_cpu_disable_loop_unrolling"}, None),
    ({hostenv.XLA_OPT_OUT: "0"}, None),
])
def test_xla_flags(env, expected):
  assert hostenv.xla_flags(env) == expected
  # Applying it twice adds nothing (a restarted launcher runs it again).
  if expected is not None:
    assert hostenv.xla_flags({"XLA_FLAGS": expected}) is None


# Adam's moment and parameter updates: three loop fusions on XLA:CPU's defaults, two with
# multi-output fusion (both moments, which read the same gradient, written by one loop). The
# child imports the training modules first, so one that made jax create its backend at import
# (and so read XLA_FLAGS before configure() set it) would show up here as three.
_XLA_CHILD = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from affect_jax.train import extract, finetune, pretrain, temporal  # noqa: F401
    from affect_jax import hostenv
    hostenv.configure()
    def adam(p, g, m, v):
      m = 0.9 * m + 0.1 * g
      v = 0.99 * v + 0.01 * g * g
      return p - 0.01 * m / (jnp.sqrt(v) + 1e-8), m, v
    x = jnp.ones((256, 256))
    hlo = jax.jit(adam).lower(x, x, x, x).compile().as_text().split("ENTRY")[1]
    print(json.dumps(sum(" fusion(" in line for line in hlo.splitlines())))
""")


@pytest.mark.parametrize("opt_out, fusions", [("1", 2), ("0", 3)])
def test_launcher_setup_reaches_the_compiler(tmp_path, opt_out, fusions):
  script = tmp_path / "xla_child.py"
  script.write_text(_XLA_CHILD)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({hostenv.XLA_OPT_OUT: opt_out, hostenv.OPT_OUT: "0", "JAX_PLATFORMS": "cpu"})
  out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True,
                       text=True, env=env).stdout
  assert json.loads(out.splitlines()[-1]) == fusions


@pytest.mark.parametrize("env, plugins, expected", [
    ({}, [], True),                                   # nothing but the CPU wheel
    ({}, ["jax-cuda12-plugin"], False),               # a GPU host
    ({}, ["libtpu"], False),                          # a TPU VM
    ({"JAX_PLATFORMS": "cpu"}, ["jax-cuda12-plugin"], True),  # told to use the CPU
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),
    ({"JAX_PLATFORMS": " CPU "}, [], True),
])
def test_cpu_only_is_decided_before_jax_starts(env, plugins, expected):
  assert hostenv.cpu_only(env, plugins) is expected


@pytest.mark.parametrize("env, argv, expected", [
    ({}, [], False),
    ({}, ["--num_processes=1"], False),
    ({}, ["--num_processes=2", "--process_id=0"], True),
    ({}, ["--num_processes", "4"], True),
    ({"SLURM_NTASKS": "8"}, [], True),
    ({"SLURM_NTASKS": "1"}, [], False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, [], True),
    ({"JAX_NUM_PROCESSES": "2"}, [], True),
    ({"WORLD_SIZE": "x"}, [], False),
])
def test_multi_process_launchers_are_recognised(env, argv, expected):
  assert hostenv.multi_process(env, argv) is expected


def test_configure_does_nothing_on_an_accelerator_host_and_never_restarts_a_multi_process_job(
    monkeypatch):
  calls = []
  monkeypatch.setattr(hostenv, "use_xla_cpu_options", lambda: calls.append("xla"))
  monkeypatch.setattr(hostenv, "use_huge_pages", lambda: calls.append("restart"))
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "WORLD_SIZE", "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(hostenv, "accelerator_plugins", lambda: ["jax-cuda13-plugin"])
  monkeypatch.setattr(hostenv.sys, "argv", ["launch/pretrain.py"])
  hostenv.configure()
  assert calls == []
  monkeypatch.setattr(hostenv, "accelerator_plugins", lambda: [])
  hostenv.configure()
  assert calls == ["xla", "restart"]
  calls.clear()
  monkeypatch.setattr(hostenv.sys, "argv", ["launch/pretrain.py", "--num_processes=2"])
  hostenv.configure()
  assert calls == ["xla"]
