"""The one file layer of the package: local paths and gs:// alike.

Every file a run or a CLI reads or writes goes through here (orbax checkpoints go
through tensorstore, which this module points at the same server). Local paths use
`os`; gs:// uses fsspec's `gcsfs`, which honours STORAGE_EMULATOR_HOST — the
convention of Google's client libraries — so tests point every access at a
fake-gcs-server on loopback. `tf.io.gfile` is not used: TensorFlow's GCS client reads
no emulator variable (TFDS reading a gs:// data_dir is the one exemption).

Objects are not files: GCS has no rename and no append. One object PUT is atomic,
so `write_bytes` is atomic on both (local: temp file + os.replace). A folder of many
files is trusted only once `publish(folder)` wrote its commit marker, last.
Transient 429/5xx answers are retried by gcsfs (6 tries, exponential backoff); a 403
becomes one sentence naming the bucket; an endpoint that cannot be reached at all is
one sentence at the first gs:// access (a TCP probe), not minutes of retries.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from tinyclip_jax import faults

# Set before gcsfs / etils / orbax are imported (tinyclip_jax/__init__.py imports this
# module first). gcsfs >= 2026 probes buckets over gRPC by default, which no emulator
# answers; we need none of those experimental (HNS / zonal) features.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# etils.epath (orbax's paths) would use tf.io.gfile when TF is importable.
os.environ.setdefault("EPATH_USE_TF", "false")

def _configure_fsspec() -> None:
  """fsspec's gcs defaults, for this module and for etils.epath under orbax: no listing
  cache (tensorstore writes objects gcsfs would not see in a cached listing), and no
  credentials lookup under an emulator (it takes none)."""
  import fsspec.config  # pylint: disable=import-outside-toplevel
  for proto in ("gs", "gcs"):
    conf = fsspec.config.conf.setdefault(proto, {})
    conf.setdefault("cache_timeout", 0)
    if os.environ.get("STORAGE_EMULATOR_HOST"):
      conf.setdefault("token", "anon")


def configure() -> None:
  """Points tensorstore (orbax) at STORAGE_EMULATOR_HOST when only that is set, and
  sets fsspec's gcs defaults. Runs at import; call again after changing the variables."""
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
  _configure_fsspec()
  _FS.clear()


_FS = {}
configure()

MARKER = "_COMMITTED"  # the commit marker of a published folder


class StorageError(OSError):
  """A path that cannot be read or written (missing bucket or object, no permission)."""

  def __str__(self):  # one sentence, no errno prefix
    return self.args[0] if self.args else ""


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def join(base, *names: str) -> str:
  base = os.fspath(base)
  if is_url(base):
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
  return os.path.join(base, *names)


def parent(path) -> str:
  path = os.fspath(path).rstrip("/")
  return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def basename(path) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def endpoint() -> tuple[str, int]:
  """(host, port) of the GCS API this process talks to (STORAGE_EMULATOR_HOST or Google's)."""
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if not host:
    return "storage.googleapis.com", 443
  rest = host.split("://", 1)[-1].split("/", 1)[0]
  name, _, port = rest.rpartition(":") if ":" in rest else (rest, "", "")
  return name, int(port) if port else (443 if host.startswith("https") else 80)


def _check_reachable(timeout: float = 10.0) -> None:
  """One TCP connection to the GCS endpoint, once per process: without a network (or
  with a wrong emulator address) gcsfs would retry every call for about two minutes
  before failing; this says so in one sentence within `timeout` seconds."""
  import socket  # pylint: disable=import-outside-toplevel
  if not os.environ.get("STORAGE_EMULATOR_HOST") and any(
      os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
    return  # behind a proxy the direct connection proves nothing; gcsfs goes through it
  host, port = endpoint()
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    raise StorageError(f"cannot reach the GCS endpoint {host}:{port} ({e}); check this "
                       "machine's network (or STORAGE_EMULATOR_HOST) before using gs:// "
                       "paths.") from None


def _gcs():
  if "gs" not in _FS:
    _check_reachable()
    import gcsfs  # pylint: disable=import-outside-toplevel
    _FS["gs"] = gcsfs.GCSFileSystem()  # fsspec.config: see _configure_fsspec
  return _FS["gs"]


def _fs(path: str):
  if path.startswith("gs://"):
    return _gcs()
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.url_to_fs(path)[0]


def bucket(path: str) -> str:
  return path.split("://", 1)[1].split("/", 1)[0]


@contextlib.contextmanager
def _errors(path: str, doing: str):
  """gcsfs / OS errors as one sentence naming the path (or the bucket)."""
  try:
    yield
  except StorageError:
    raise
  except FileNotFoundError:
    raise StorageError(f"{path} does not exist (while {doing}); check the path"
                       + (f" and that the bucket gs://{bucket(path)} exists."
                          if path.startswith("gs://") else ".")) from None
  except (OSError, ValueError) as e:
    text = str(e)
    if text.startswith("Forbidden") or isinstance(e, PermissionError):  # gcsfs: a 403
      where = f"the bucket gs://{bucket(path)}" if path.startswith("gs://") else path
      raise StorageError(f"permission denied on {where} (while {doing} {path}); grant this "
                         "account access to it or choose another path.") from None
    if not is_url(path) or isinstance(e, StorageError):
      raise
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    raise StorageError(f"{path} could not be accessed while {doing} ({first}).") from None


# -- reading ------------------------------------------------------------------

def exists(path) -> bool:
  path = os.fspath(path)
  if not is_url(path):
    return os.path.exists(path)
  with _errors(path, "checking"):
    return _fs(path).exists(path)


def isdir(path) -> bool:
  path = os.fspath(path)
  if not is_url(path):
    return os.path.isdir(path)
  with _errors(path, "checking"):
    return _fs(path).isdir(path)


def read_bytes(path) -> bytes:
  path = os.fspath(path)
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  with _errors(path, "reading"):
    return _fs(path).cat_file(path)


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def read_json(path) -> Any:
  return json.loads(read_text(path))


def open_read(path, block_size: int = 8 << 20):
  """A file object for a streaming read (large blocks: few requests per object)."""
  path = os.fspath(path)
  if not is_url(path):
    return open(path, "rb")
  with _errors(path, "opening"):
    return _fs(path).open(path, "rb", block_size=block_size, cache_type="readahead")


def listdir(folder) -> list[str]:
  """Names directly in `folder`, sorted ([] when it does not exist)."""
  folder = os.fspath(folder)
  if not is_url(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  with _errors(folder, "listing"):
    fs = _fs(folder)
    try:
      entries = fs.ls(folder.rstrip("/"), detail=False, refresh=True)
    except FileNotFoundError:
      if not fs.exists(f"gs://{bucket(folder)}"):
        raise
      return []
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    names.discard(basename(folder))  # ls of a file lists the file itself
    return sorted(names)


def glob(pattern) -> list[str]:
  """Paths matching a glob (`*`, `?`, `[…]`), sorted; gs:// results keep the scheme."""
  pattern = os.fspath(pattern)
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return sorted(glob_lib.glob(pattern))
  with _errors(pattern, "listing"):
    if not exists(f"gs://{bucket(pattern)}"):
      raise FileNotFoundError(pattern)
    found = _fs(pattern).glob(pattern, refresh=True)
  return sorted(p if "://" in p else f"gs://{p}" for p in found)


def match(folder: str, name_pattern: str) -> list[str]:
  return [n for n in listdir(folder) if fnmatch.fnmatchcase(n, name_pattern)]


# -- writing ------------------------------------------------------------------

def makedirs(folder) -> None:
  """Local: mkdir -p. GCS has no folders (a no-op)."""
  folder = os.fspath(folder)
  if not is_url(folder):
    os.makedirs(folder, exist_ok=True)


def write_bytes(path, data: bytes) -> None:
  """Atomic: readers see the old object or the whole new one, never a part."""
  path = os.fspath(path)
  if is_url(path):
    with _errors(path, "writing"):
      _fs(path).pipe_file(path, bytes(data))  # one PUT: atomic on GCS
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path, obj: Any, **kwargs) -> None:
  write_text(path, json.dumps(obj, **({"indent": 2} | kwargs)))


def remove(path) -> None:
  """Removes a file or a folder tree (nothing when absent)."""
  path = os.fspath(path)
  if not is_url(path):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    return
  with _errors(path, "removing"):
    fs = _fs(path)
    found = fs.find(path.rstrip("/"), withdirs=False)
    if found:
      fs.rm(found)


def check_writable(folder) -> None:
  """Writes and removes a probe object: a missing bucket or a read-only one is found
  before a run's first step, not at its first checkpoint."""
  folder = os.fspath(folder)
  if not is_url(folder):
    return  # a local folder is created with the first file (a failed setup leaves none)
  probe = join(folder, f".write_probe_{os.getpid()}")
  try:
    write_bytes(probe, b"")
  except StorageError:
    if not exists(f"gs://{bucket(folder)}"):
      raise StorageError(f"cannot write {folder}: the bucket gs://{bucket(folder)} does not "
                         "exist; create it or fix the path.") from None
    raise
  remove(probe)


# -- published folders -----------------------------------------------------------

def publish(folder, info: dict | None = None) -> None:
  """Marks `folder` complete: its marker is written after every file in it."""
  faults.in_write(f"publish:{basename(folder)}")
  write_json(join(folder, MARKER), info or {})


def is_published(folder) -> bool:
  return exists(join(folder, MARKER))


def unpublish(folder) -> None:
  """Removes the marker first, so a half-removed folder is never trusted."""
  path = join(folder, MARKER)
  if exists(path):
    remove(path)


def copy_local(src: str, dst: str) -> None:
  """Copies a local file tree to `dst` (local or gs://), file by file."""
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    for name in files:
      target = join(dst, *(() if rel == "." else rel.split(os.sep)), name)
      with open(os.path.join(root, name), "rb") as f:
        write_bytes(target, f.read())


def walk_files(folder) -> Iterator[str]:
  """Every file under `folder` (full paths), sorted."""
  folder = os.fspath(folder)
  if not is_url(folder):
    for root, _, files in sorted(os.walk(folder)):
      for name in sorted(files):
        yield os.path.join(root, name)
    return
  with _errors(folder, "listing"):
    found = _fs(folder).find(folder.rstrip("/"), withdirs=False)
  yield from sorted(p if "://" in p else f"gs://{p}" for p in found)


# -- tools that read or write local files only -------------------------------------

@contextlib.contextmanager
def local_copy(path: str, keep_url: bool = False) -> Iterator[str]:
  """A local path holding `path`: itself, or a gs:// file or folder fetched into a
  temporary folder (removed afterwards). keep_url: URLs pass through unchanged (for
  readers that take gs:// themselves, e.g. orbax)."""
  if not is_url(path) or keep_url:
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="tinyclip_fetch_")
  try:
    local = os.path.join(tmp, basename(path))
    if isdir(path):
      for f in walk_files(path):
        write_bytes(os.path.join(local, *f[len(path.rstrip("/")) + 1:].split("/")),
                    read_bytes(f))
    else:
      write_bytes(local, read_bytes(path))
    yield local
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def staged_output(path: str, folder: bool, keep_url: bool = False) -> Iterator[str]:
  """A local path to write `path` at; for gs:// it is a temporary folder uploaded when
  the body succeeds: a folder output is then published (marker last); a file output
  goes up with whatever was written beside it (e.g. a sidecar config)."""
  if not is_url(path) or keep_url:
    yield path
    return
  tmp = tempfile.mkdtemp(prefix="tinyclip_stage_")
  try:
    local = os.path.join(tmp, basename(path))
    yield local
    if folder:
      unpublish(path)
      copy_local(local, path)
      publish(path)
    else:
      copy_local(tmp, parent(path))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
