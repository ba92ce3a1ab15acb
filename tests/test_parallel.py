"""The mesh (one -1 filled by the remaining devices) and shape-fitted shardings."""
import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tinyclip_jax import parallel


def sizes(data, fsdp=1, tensor=1):
  return {"data": data, "fsdp": fsdp, "tensor": tensor}


@pytest.mark.parametrize("given, n, want", [
    (sizes(-1), 8, (8, 1, 1)),
    (sizes(2, -1), 8, (2, 4, 1)),
    (sizes(-1, 2, 2), 8, (2, 2, 2)),
    (sizes(4, 2, -1), 8, (4, 2, 1)),
    (sizes(4, 2), 8, (4, 2, 1)),
    (sizes(-1), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_one_minus_one(given, n, want):
  assert parallel.mesh_shape(given, n) == want


@pytest.mark.parametrize("given, n, words", [
    (sizes(-1, -1), 8, "more than one -1"),
    (sizes(0), 8, "invalid size"),
    (sizes(-2), 8, "invalid size"),
    (sizes(-1, 3), 8, "not divisible by 3"),
    (sizes(3), 8, "needs 3 devices but 8 are available"),
    (sizes(4, 4), 8, "needs 16 devices"),
])
def test_mesh_shape_errors_name_the_fix(given, n, words):
  with pytest.raises(parallel.MeshError, match=words) as e:
    parallel.mesh_shape(given, n)
  assert "mesh." in str(e.value) or "-1" in str(e.value)


def test_make_mesh_on_all_or_some_devices():
  mesh = parallel.make_mesh(sizes(-1, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert parallel.batch_size_per_axis(mesh) == 4
  one = parallel.make_mesh(sizes(-1), jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert parallel.batch_size_per_axis(one) == 1
  assert parallel.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)


def test_fit_shardings_replicates_dims_the_mesh_axis_does_not_divide():
  mesh = parallel.make_mesh(sizes(2, 2, 2))
  s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
  shardings = {"a": s("fsdp", "tensor"), "b": s("fsdp", "tensor"), "c": s(None, "tensor"),
               "d": s(("data", "fsdp")), "e": s(("data", "fsdp")), "f": s()}
  shapes = {"a": jax.ShapeDtypeStruct((6, 4), "float32"),
            "b": jax.ShapeDtypeStruct((3, 4), "float32"),     # 3 % fsdp(2)
            "c": jax.ShapeDtypeStruct((8, 3, 5), "float32"),  # 3 % tensor(2); spec shorter
            "d": jax.ShapeDtypeStruct((8,), "float32"),
            "e": jax.ShapeDtypeStruct((6,), "float32"),       # 6 % (data × fsdp = 4)
            "f": jax.ShapeDtypeStruct((5, 5), "float32")}
  fitted = parallel.fit_shardings(shardings, shapes)
  assert {k: v.spec for k, v in fitted.items()} == {
      "a": P("fsdp", "tensor"), "b": P(None, "tensor"), "c": P(None, None, None),
      "d": P(("data", "fsdp")), "e": P(None), "f": P(None, None)}
  assert all(v.mesh is mesh for v in fitted.values())


def test_logical_rules_map_model_axes_to_the_mesh():
  mesh = parallel.make_mesh(sizes(2, 2, 2))
  got = parallel.logical_to_sharding({"w": P("embed", "mlp"), "b": P("heads", "kv"),
                                      "x": P("batch", None)}, mesh)
  assert got["w"].spec == P("fsdp", "tensor")
  assert got["b"].spec == P("tensor", None)
  assert got["x"].spec == P(("data", "fsdp"), None)


def test_orbax_info_chatter_is_filtered_but_warnings_and_ours_kept():
  import logging

  from tinyclip_jax import main

  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "msg", None, None)

  quiet = main._QuietLibraries()
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not quiet.filter(record(orbax, logging.INFO))
  assert quiet.filter(record(orbax, logging.WARNING))
  assert quiet.filter(record("/work/tinyclip_jax/train/loop.py", logging.INFO))
