"""A persistent compilation cache for one test module's process: programs it compiles
again (the same teacher initialised by each run, the same step in a restarted run) are
loaded instead. Only the time changes: a cached program is the executable XLA made."""
from __future__ import annotations

import jax
import pytest
from jax._src import compilation_cache

KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  old = {k: getattr(jax.config, k) for k in KEYS}
  compilation_cache.reset_cache()  # jax opens its cache once per process: open this one
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
