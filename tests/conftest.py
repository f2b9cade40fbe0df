"""Test-wide settings, applied before anything imports jax.

- CPU only, emulating 8 devices so sharded code runs as on a pod slice (single-device code
  is unaffected: it runs on device 0).
- A persistent XLA compilation cache outside the clone, so reruns skip recompiling.
- XLA:CPU's options as the launchers set them (`hostenv.use_xla_cpu_options`), so the tests
  compile the programs the jobs run; plus the least LLVM optimisation of the generated code
  (`--xla_backend_optimization_level=0`): the same HLO and numerics up to rounding, compiled
  about twice as fast, which is most of what the suite spends on a cold cache. The launchers
  the multi-process tests start inherit it.
"""

import os

from affect_jax import hostenv

os.environ.setdefault("JAX_PLATFORMS", "cpu")
hostenv.use_xla_cpu_options()
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after the env var on purpose)

NUM_TEST_DEVICES = 8

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("AFFECT_JAX_TEST_CACHE", os.path.expanduser("~/.cache/affect_jax/xla_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


import pytest  # noqa: E402

from affect_jax.data import synthetic  # noqa: E402

# The synthetic dataset most tests share: a handful of short videos of small faces.
TINY_SYNTHETIC = synthetic.SyntheticConfig(num_videos=8, min_frames=60, max_frames=120,
                                           image_size=32, seed=11)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic_tiny")
  synthetic.generate(root, TINY_SYNTHETIC)
  return root


@pytest.fixture
def absl_flags_parsed():
  """absl flags parsed, as in a launcher: grain's worker processes read them."""
  from absl import flags
  parsed = flags.FLAGS.is_parsed()
  if not parsed:
    flags.FLAGS.mark_as_parsed()
  yield
  if not parsed:
    flags.FLAGS.unparse_flags()
