"""The project's model checkpoint: one folder holding

  params/             the Flax params, written by orbax-checkpoint (with BatchNorm
                      running statistics `mean`/`var` for ResNet towers)
  model_config.json   CLIPConfig.to_json(), so the folder defines its own model
  extra.json          optional free-form JSON (e.g. where the weights came from)

Local folders are built under a temporary name next to the destination and renamed
when complete. GCS has no rename: there the old folder's commit marker is removed,
the files written in place, and the marker (storage.publish) written last; a reader
of a gs:// folder trusts it only when the marker is there. All I/O goes through
tinyclip_jax.storage (orbax/tensorstore for the arrays). Saving is for a single
process (conversion, export); multi-host training checkpoints are
tinyclip_jax.checkpoint's job.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from etils import epath

from tinyclip_jax import faults, storage
from tinyclip_jax.models.config import CLIPConfig, ConfigError
from tinyclip_jax.models.params import CheckpointError, check_params

PARAMS = "params"
CONFIG = "model_config.json"
EXTRA = "extra.json"


def _path(directory) -> epath.Path:
  text = os.fspath(directory)
  # orbax wants absolute paths; URIs (gs://…) already are.
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _listing(path: epath.Path) -> str:
  names = sorted(p.name for p in path.iterdir())
  return ", ".join(names[:8]) + (" …" if len(names) > 8 else "") if names else "nothing"


@contextlib.contextmanager
def staging_dir(directory, overwrite: bool = False) -> Iterator[epath.Path]:
  """Yields an empty folder to write into; on success it becomes `directory`.

  Refuses (CheckpointError) when `directory` is a file, or a non-empty folder and
  overwrite is False. Local: a staging folder next to `directory`, renamed over it
  (on failure removed, `directory` left as it was). gs://: `directory` itself,
  unpublished first and published by the caller's `storage.publish` at the end.
  """
  dest = _path(directory)
  if storage.is_url(str(dest)):
    _check_destination(dest, overwrite, storage.listdir(str(dest)))
    storage.unpublish(str(dest))  # first: a half-replaced folder is never trusted
    storage.remove(str(dest))
    yield dest
    return
  if dest.exists():
    if not dest.is_dir():
      raise CheckpointError(f"{dest} is a file; give a folder path for the checkpoint.")
    _check_destination(dest, overwrite, list(dest.iterdir()))
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.parent / f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    _replace(tmp, dest)
  except BaseException:
    if tmp.exists():
      tmp.rmtree()
    raise


def _check_destination(dest, overwrite: bool, found: list) -> None:
  if found and not overwrite:
    raise CheckpointError(f"{dest} already exists and is not empty; pass overwrite=True "
                          "(--overwrite) to replace it.")


def _replace(tmp: epath.Path, dest: epath.Path) -> None:
  old = None
  if dest.exists():  # set aside first: rename cannot replace a non-empty folder
    old = dest.parent / f"{dest.name}.old-{uuid.uuid4().hex[:8]}"
    dest.rename(old)
  tmp.rename(dest)
  if old is not None:
    old.rmtree()


def _savable(params: Mapping[str, Any]):
  # numpy scalars / Python numbers become 0-d arrays so orbax stores them as arrays.
  return jax.tree.map(lambda x: x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x),
                      dict(params))


def _this_process_only():
  """A checkpointer whose barriers involve this process alone: in a multi-host run one
  process writes the (host numpy) export while the others wait elsewhere."""
  import orbax.checkpoint as ocp
  me = jax.process_index()
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(), multiprocessing_options=(
      ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                         barrier_sync_key_prefix=f"export{me}")))


def save_model(directory, params: Mapping[str, Any], config: CLIPConfig,
               extra: dict | None = None, overwrite: bool = False) -> epath.Path:
  """Writes a model checkpoint folder; returns its path."""
  import orbax.checkpoint as ocp
  check_params(params, config)  # never write a checkpoint that load_model would refuse
  with staging_dir(directory, overwrite) as tmp:
    ocp.PyTreeCheckpointer().save(tmp / PARAMS, _savable(params)) if jax.process_count() == 1 \
        else _this_process_only().save(tmp / PARAMS, _savable(params))
    faults.in_write("export")
    storage.write_text(str(tmp / CONFIG), config.to_json())
    if extra is not None:
      storage.write_text(str(tmp / EXTRA), json.dumps(extra, indent=2, sort_keys=True,
                                                      default=str))
    storage.publish(str(tmp))
  return _path(directory)


def _require_checkpoint(path: epath.Path) -> None:
  if not path.exists():
    raise CheckpointError(f"{path} does not exist; give a folder written by save_model.")
  if not path.is_dir():
    raise CheckpointError(f"{path} is a file, but a model checkpoint folder (params/ + "
                          f"{CONFIG}) was expected.")
  if storage.is_url(str(path)) and not storage.is_published(str(path)):
    raise CheckpointError(f"{path} is incomplete (no {storage.MARKER} marker: its writer "
                          "stopped before the end); write it again.")
  for name in (CONFIG, PARAMS):
    if not (path / name).exists():
      raise CheckpointError(f"{path} is not a model checkpoint: it has no {name} (found: "
                            f"{_listing(path)}).")


def load_config(directory) -> CLIPConfig:
  path = _path(directory)
  _require_checkpoint(path)
  try:
    return CLIPConfig.from_json(storage.read_text(str(path / CONFIG)))
  except (ConfigError, ValueError) as e:
    raise CheckpointError(f"{path / CONFIG} does not describe a model ({e}).") from None


def _restore_numpy(path: epath.Path) -> dict:
  import orbax.checkpoint as ocp
  ckptr = ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    # Restoring as numpy ignores the saving run's devices and sharding.
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree))
    params = ckptr.restore(path, restore_args=args)
  except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged folders
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(f"{path} could not be read by orbax ({first}); the checkpoint is "
                          "damaged or incomplete.") from None
  return jax.tree.map(np.asarray, params)


def load_model(directory) -> tuple[dict, CLIPConfig]:
  """(params as nested dicts of numpy arrays, CLIPConfig); shapes checked against the config."""
  path = _path(directory)
  config = load_config(path)
  params = _restore_numpy(path / PARAMS)
  check_params(params, config)
  return params, config


def load_extra(directory) -> dict:
  """The checkpoint's extra.json ({} when it has none)."""
  path = _path(directory) / EXTRA
  return storage.read_json(str(path)) if storage.exists(str(path)) else {}
