"""TinyCLIP distillation in JAX."""
# First: sets the storage environment (emulator endpoint for tensorstore, epath off TF)
# before gcsfs, etils or orbax are imported anywhere in the package.
from tinyclip_jax import storage as _storage  # noqa: F401  pylint: disable=unused-import
