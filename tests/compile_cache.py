"""One persistent compilation cache per test process (each xdist worker its own), and
for the programs it starts (CLI tests): a program compiled again — the same teacher
initialised by each run, the same tiny step in another module, a restarted run — is
loaded instead. Only the time changes: a cached program is the executable XLA made.

The cache has a size limit, which makes jax take a file lock around every read and
write, so processes that share it (a multihost test's processes) never read a
half-written entry."""
from __future__ import annotations

import os

import jax
import pytest
from jax._src import compilation_cache

SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.5,
            "jax_persistent_cache_min_entry_size_bytes": 0,
            "jax_compilation_cache_max_size": 4 << 30}


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("jax_cache"))
  compilation_cache.reset_cache()  # jax opens its cache once per process: open this one
  jax.config.update("jax_compilation_cache_dir", path)
  for k, v in SETTINGS.items():
    jax.config.update(k, v)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path  # the CLI tests' processes
  for k, v in SETTINGS.items():
    os.environ[k.upper()] = str(v)
  yield path


@pytest.fixture(scope="module")
def compile_cache(session_compile_cache):
  """Modules that compile the same programs again ask for it by name (it is on for
  every test)."""
  yield session_compile_cache
