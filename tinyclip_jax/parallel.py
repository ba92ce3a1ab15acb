"""Device mesh and the one table that maps logical axes onto it.

Modules name logical axes only ("embed", "heads", "mlp", ...); `RULES` maps them to
mesh axes. The batch is split over ('data', 'fsdp'); parameters are sharded over
'fsdp' along their embedding axis (ZeRO-3 style) and over 'tensor' along heads,
MLP and vocabulary. A new parallelism layout is a new table, not new model code.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
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


# The replication guard's default bound. A model whose widths the mesh divides
# reports 0; a non-dividing axis under biases and norms alone stays under 1% of a
# transformer's bytes, while a non-dividing width replicates whole matrices (the
# attention is ~1/3 of a block, the MLP ~2/3, the hidden width all of it).
MAX_REPLICATED_FRACTION = 0.05
REPLICATION_POLICIES = ("warn", "error")


class MeshError(ValueError):
  """A mesh that cannot be built from the available devices."""


class ReplicationError(ValueError):
  """More parameter bytes are replicated than mesh.max_replicated_fraction allows."""


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


def _mesh_names(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def axis_size(logical: str, sizes: dict[str, int], rules=RULES) -> int:
  """Devices a dimension of logical axis `logical` is split over (1 if unsharded)."""
  return math.prod(int(sizes[n]) for n in _mesh_names(dict(rules).get(logical)))


@dataclasses.dataclass(frozen=True)
class Replicated:
  """One parameter whose logical axes asked for mesh axes that its shape does not divide."""
  name: str
  shape: tuple[int, ...]
  nbytes: int
  dropped: tuple[str, ...]  # the mesh axes it is replicated over instead
  fully: bool  # no mesh axis is left: every device holds all of it


@dataclasses.dataclass(frozen=True)
class ReplicationReport:
  rows: tuple[Replicated, ...]  # largest first
  replicated_bytes: int
  total_bytes: int

  @property
  def fraction(self) -> float:
    return self.replicated_bytes / self.total_bytes if self.total_bytes else 0.0


def replication_report(shardings, shapes, mesh: Mesh) -> ReplicationReport:
  """Which parameters `fit_shardings` would replicate over mesh axes their logical
  axes asked for. `shardings`: the derived (not yet fitted) NamedShardings or mesh
  PartitionSpecs; `shapes`: arrays or ShapeDtypeStructs of the same tree."""
  is_spec = lambda x: isinstance(x, (P, NamedSharding))  # noqa: E731
  specs = jax.tree.map(lambda s: s.spec if isinstance(s, NamedSharding) else s, shardings,
                       is_leaf=is_spec)
  rows, total = [], 0
  for (path, spec), shape in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec),
                                 jax.tree.leaves(shapes)):
    nbytes = math.prod(shape.shape) * np.dtype(shape.dtype).itemsize
    total += nbytes
    asked, kept = [], []
    for dim, axes in zip(shape.shape, tuple(spec) + (None,) * len(shape.shape)):
      names = _mesh_names(axes)
      size = math.prod(mesh.shape[n] for n in names)
      asked += [n for n in names if mesh.shape[n] > 1]
      kept += [n for n in names if mesh.shape[n] > 1 and dim % size == 0]
    if len(kept) < len(asked):
      dropped = tuple(n for n in asked if n not in kept)
      rows.append(Replicated(jax.tree_util.keystr(path), tuple(shape.shape), nbytes, dropped,
                             not kept))
  rows.sort(key=lambda r: -r.nbytes)
  return ReplicationReport(tuple(rows), sum(r.nbytes for r in rows), total)


def check_policy(policy: str, limit: float) -> None:
  """Field checks of mesh.replication and mesh.max_replicated_fraction."""
  if policy not in REPLICATION_POLICIES:
    raise ValueError(f"mesh.replication {policy!r} is unknown; use one of {REPLICATION_POLICIES}.")
  if not 0.0 <= float(limit) <= 1.0:
    raise ValueError(f"mesh.max_replicated_fraction {limit} must lie in [0, 1] (a fraction of "
                     f"the parameter bytes; default {MAX_REPLICATED_FRACTION}).")


def _mib(nbytes: int) -> str:
  return f"{nbytes / 2**20:.2f} MiB"


def check_replication(report: ReplicationReport, limit: float, policy: str, what: str,
                      fix: str = "") -> str:
  """Logs the report once; over `limit` (a fraction of parameter bytes) warns or, with
  policy 'error', raises ReplicationError. Returns the warning ("" within the limit)."""
  check_policy(policy, limit)
  logging.info("%s: %d parameters (%s, %.1f%% of %s) replicated though their logical axes ask "
               "for sharding%s", what, len(report.rows), _mib(report.replicated_bytes),
               100 * report.fraction, _mib(report.total_bytes),
               "".join(f"; {r.name} {r.shape} over {'×'.join(r.dropped)}" for r in report.rows[:8]))
  if report.fraction <= limit:
    return ""
  worst = ", ".join(f"{r.name} {r.shape} ({_mib(r.nbytes)}, over {'×'.join(r.dropped)})"
                    for r in report.rows[:3])
  fix = fix or ("use mesh sizes that divide the model's widths (mesh.fsdp the hidden width, "
                "mesh.tensor the heads and MLP widths)")
  message = (f"{what}: {100 * report.fraction:.1f}% of the parameter bytes "
             f"({_mib(report.replicated_bytes)} in {len(report.rows)} parameters) are replicated "
             f"because the mesh does not divide their dimensions, over the limit "
             f"mesh.max_replicated_fraction={limit}; the largest: {worst}; {fix}, or raise "
             "mesh.max_replicated_fraction.")
  if policy == "error":
    raise ReplicationError(message)
  logging.warning("%s", message)
  return message


def guard(shardings, shapes, mesh: Mesh, mesh_config, what: str, fix: str = "") -> str:
  """replication_report + check_replication with the bound and policy of `mesh_config`
  (config.mesh): the check a run makes wherever it derives a model's shardings."""
  limit = mesh_config.get("max_replicated_fraction", MAX_REPLICATED_FRACTION)
  policy = mesh_config.get("replication", "warn")
  return check_replication(replication_report(shardings, shapes, mesh), limit, policy, what, fix)


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
