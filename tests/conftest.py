"""Test-wide settings: CPU only, and a persistent XLA compilation cache outside the clone
so repeated runs (and tests that compile the same function) skip recompiling."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the env var on purpose)

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("AFFECT_JAX_TEST_CACHE", os.path.expanduser("~/.cache/affect_jax/xla_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
