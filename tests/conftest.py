"""Test setup: 8 simulated CPU devices for mesh tests, float32 matmuls."""
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One fake-gcs-server per test process (session scope), shared by every module that
# takes the `gcs` fixture (tests/gcs_fixtures.py).
from gcs_fixtures import gcs  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
# A module's persistent compilation cache (tests/compile_cache.py), for modules whose
# runs compile the same programs again.
from compile_cache import compile_cache  # noqa: E402,F401  pylint: disable=unused-import,wrong-import-position
