"""Device mesh and the one table that maps logical axes onto it.

Modules name logical axes only ("embed", "heads", "mlp", ...); `RULES` maps them to
mesh axes. The batch is split over ('data', 'fsdp'); parameters are sharded over
'fsdp' along their embedding axis (ZeRO-3 style) and over 'tensor' along heads,
MLP and vocabulary. A new parallelism layout is a new table, not new model code.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("proj", None),
)


class MeshError(ValueError):
  """A mesh that cannot be built from the available devices."""


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Per-axis sizes with one -1 filled by the remaining devices (MaxText's rule)."""
  dims = [int(sizes[a]) for a in MESH_AXES]
  if dims.count(-1) > 1:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))} has more than one -1; "
                    "set at most one of mesh.data/mesh.fsdp/mesh.tensor to -1.")
  if any(d == 0 or d < -1 for d in dims):
    raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))} has an invalid size; "
                    "use positive sizes or -1.")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))} cannot be filled: {num_devices} "
                      f"devices are not divisible by {known}; choose sizes that divide "
                      f"{num_devices}.")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices but "
                    f"{num_devices} are available; set one of mesh.data/mesh.fsdp/"
                    "mesh.tensor to -1 or make their product match.")
  return tuple(dims)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  try:  # topology-aware placement on TPU/GPU; plain reshape elsewhere
    arr = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # noqa: BLE001 - CPU and odd topologies
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def batch_size_per_axis(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_to_sharding(logical_specs, mesh: Mesh, rules=RULES):
  """A pytree of logical PartitionSpecs → NamedShardings on `mesh`."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P))


def fit_shardings(shardings, shapes):
  """Drops mesh axes that do not divide a dimension (e.g. a 3-way qkv axis or a
  pruned width), so any model shards on any mesh; such dims are replicated."""
  def fit(sharding: NamedSharding, shape):
    spec = []
    for dim, axes in zip(shape.shape, tuple(sharding.spec) + (None,) * len(shape.shape)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = math.prod(sharding.mesh.shape[n] for n in names)
      spec.append(axes if names and dim % size == 0 else None)
    return NamedSharding(sharding.mesh, P(*spec))
  return jax.tree.map(fit, shardings, shapes)


def host_gather(tree):
  """numpy copies of (possibly sharded, multi-host) global arrays, on every process.

  Every process must call it (it is a collective when there are several)."""
  if jax.process_count() == 1:
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def barrier(name: str) -> None:
  """Waits for every process (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
