"""Test-wide settings, applied before anything imports jax.

- CPU only, emulating 8 devices so sharded code runs as on a pod slice (single-device code
  is unaffected: it runs on device 0).
- A persistent XLA compilation cache outside the clone, so reruns skip recompiling.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the env var on purpose)

NUM_TEST_DEVICES = 8

jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("AFFECT_JAX_TEST_CACHE", os.path.expanduser("~/.cache/affect_jax/xla_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
