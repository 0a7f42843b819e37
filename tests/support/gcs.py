"""A real-HTTP Google Cloud Storage for tests: gcp-storage-emulator behind a fixing, fault-injecting proxy.

Independent of pytest. Two kinds of clients reach the same in-memory emulator:

* google-cloud-storage (and anything honouring ``STORAGE_EMULATOR_HOST``) over plain HTTP on
  ``127.0.0.1:<free port>``;
* TensorFlow's native ``gs://`` filesystem, whose endpoints are fixed
  (``https://www.googleapis.com``, ``https://storage.googleapis.com``): inside
  ``scripts/sandbox.sh`` those names resolve to 127.0.0.1, where the proxy listens with TLS on
  :443 (a CA trustme makes at start, trusted through ``CURL_CA_BUNDLE``) and plainly on :80.

All traffic goes through the proxy, which:

* de-chunks ``Transfer-Encoding: chunked`` request bodies and forwards them with a true
  ``Content-Length`` (TF's resumable-upload PUT is chunked *and* carries a Content-Length; the
  emulator trusts the latter and stores the chunk framing: corrupt data);
* turns an empty ``uploadType=media`` upload (TF creates ``dir/`` markers that way; the emulator
  crashes on it) into an equivalent multipart upload of zero bytes;
* answers ``GET /storage/v1/b/<bucket>/storageLayout`` (flat namespace), which TF asks before
  renaming a directory and the emulator lacks (404 made ``tf.io.gfile.rename(dir)`` fail);
* never forwards a request whose body was cut short (a killed client), as GCS would not commit it;
* enforces ``ifGenerationMatch`` / ``ifGenerationNotMatch`` on object writes, deletes and reads
  (the emulator ignores them), so create-only writes (``ifGenerationMatch=0``) answer 412 as on GCS;
* keeps the client's ``Host`` header (the emulator builds resumable-upload ``Location`` URLs from
  it); a ``Location`` given to a TLS client is rewritten to ``https://`` as real GCS does, and
  port 80 serves the plain ``http://`` form too;
* injects faults (:meth:`GcsEmulator.fail_next`, :meth:`GcsEmulator.deny`, ...) and records
  every request in :attr:`GcsEmulator.request_log`.

Usage::

    with GcsEmulator(buckets=["data"]) as gcs:
        env = {**os.environ, **gcs.env()}
        subprocess.run([...], env=env, check=True)   # tf.io.gfile on gs://data/...
"""

from __future__ import annotations

import collections
import contextlib
import email.parser
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

log = logging.getLogger(__name__)

STORAGE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
SANDBOX_HINT = "run the tests through scripts/sandbox.sh (scripts/test.sh does)"
TEST_TOKEN = "test-token"
TEST_PROJECT = "test-project"

# Reasons GCS gives in JSON error bodies, by status.
_REASONS = {
    400: "invalid",
    401: "required",
    403: "forbidden",
    404: "notFound",
    408: "requestTimeout",
    409: "conflict",
    412: "conditionNotMet",
    429: "rateLimitExceeded",
    500: "backendError",
    502: "backendError",
    503: "backendError",
    504: "backendError",
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "content-length",
}


def in_sandbox() -> bool:
    """True when both storage host names resolve to 127.0.0.1 (inside scripts/sandbox.sh)."""
    try:
        return all(socket.gethostbyname(host) == "127.0.0.1" for host in STORAGE_HOSTS)
    except OSError:
        return False


def gcs_error_body(status: int, message: str | None = None) -> bytes:
    """A JSON error body shaped like the ones GCS sends."""
    reason = _REASONS.get(status, "backendError")
    if message is None:
        if status == 403:
            message = (
                "test-identity does not have storage.objects.get access to the Google Cloud Storage object. "
                "Permission 'storage.objects.get' denied on resource (or it may not exist)."
            )
        else:
            message = f"injected {status} {http.client.responses.get(status, '')}".strip()
    error = {"code": status, "message": message, "errors": [{"message": message, "domain": "global", "reason": reason}]}
    return json.dumps({"error": error}).encode()


class LoggedRequest(NamedTuple):
    """One request as the proxy saw it: ``path`` is the raw request target (with its query)."""

    method: str
    path: str
    status: int  # 0 = connection dropped by an injected fault


class _Rule:
    def __init__(self, kind, *, remaining, status, methods, path_contains, delay=0.0, message=None):
        self.kind = kind  # "fail" | "drop" | "delay" | "deny"
        self.remaining = remaining  # None = until allow()/reset()
        self.status = status
        self.methods = {m.upper() for m in methods} if methods else None
        self.path_contains = path_contains
        self.delay = delay
        self.message = message

    def matches(self, methods: set[str], path: str) -> bool:
        if self.methods is not None and not (self.methods & methods):
            return False
        if self.path_contains is not None:
            return self.path_contains in path or self.path_contains in urllib.parse.unquote(path)
        return True


# --------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------


def make_certificates(directory: str, hosts: Iterable[str] = (*STORAGE_HOSTS, "localhost"), ips=("127.0.0.1",)):
    """Write ``ca.pem`` (trust this), ``server.pem`` (chain) and ``server.key`` into ``directory``.

    trustme makes a test CA and a server certificate signed by it whose SANs are ``hosts`` and
    ``ips``: TF's gs:// (curl, through ``CURL_CA_BUNDLE``) and Python's ssl both verify it against
    the CA. Returns (ca_path, cert_path, key_path).
    """
    import trustme

    ca = trustme.CA(organization_name="vgg-trainer tests")
    leaf = ca.issue_cert(*hosts, *ips)
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key"))
    ca.cert_pem.write_to_path(paths[0])
    with open(paths[1], "wb") as f:
        f.write(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(paths[2])
    os.chmod(paths[2], 0o600)
    return paths


# --------------------------------------------------------------------------------------------
# Proxy
# --------------------------------------------------------------------------------------------


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, harness: GcsEmulator, tls: ssl.SSLContext | None, name: str):
        self.harness = harness
        self.tls = tls is not None
        self.name = name
        super().__init__(address, _ProxyHandler)
        if tls is not None:
            # Handshake in the handler thread (setup()), not in the accept loop.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request, client_address):  # quiet: clients that hang up are normal
        log.debug("proxy connection error from %s", client_address, exc_info=True)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, 100-continue (curl sends Expect for big PUTs)
    server_version = "gcs-test-proxy"
    timeout = 300
    disable_nagle_algorithm = True
    server: _ProxyServer

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(30)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format, *args):
        log.debug("proxy: " + format, *args)

    def _read_body(self) -> tuple[bytes, bool]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise ConnectionError("client closed during a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return bytes(body), True
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise ConnectionError("client closed during a chunked body")
                body += chunk
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if len(body) < length:  # a killed client: never forward a truncated upload
            raise ConnectionError("client closed before the end of the body")
        return body, False

    def _reply(self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = (), reason: str | None = None):
        self.send_response(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        if status not in (204, 304) and not 100 <= status < 200:
            self.send_header("Content-Length", str(len(body)))
        # Head and body in one write: with keep-alive, two small writes meet the peer's delayed ACK (~40 ms).
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD" and body:
            self._headers_buffer.append(body)
        self.flush_headers()

    def _handle(self):
        harness = self.server.harness
        path = self.path
        if path.startswith(("http://", "https://")):  # absolute-form target
            parts = urllib.parse.urlsplit(path)
            path = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        harness._count_listener(self.server.name)
        try:
            body, chunked = self._read_body()
        except (ConnectionError, ValueError, OSError):
            log.debug("incomplete request body for %s %s: not forwarded", self.command, path)
            self.close_connection = True
            return
        methods = {self.command}
        override = self.headers.get("X-HTTP-Method-Override")
        if override:
            methods.add(override.upper())

        for rule in harness._take_rules(methods, path):
            if rule.kind == "delay":
                time.sleep(rule.delay)
            elif rule.kind == "drop":
                harness._log(self.command, path, 0)
                self.close_connection = True
                return
            else:  # fail / deny
                harness._log(self.command, path, rule.status)
                self._reply(rule.status, gcs_error_body(rule.status, rule.message),
                            [("Content-Type", "application/json; charset=UTF-8")])  # fmt: skip
                return

        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        status, reason, resp_headers, data = harness._forward(self.command, path, headers, body, tls=self.server.tls)
        if chunked:
            harness._count("dechunked")
        harness._log(self.command, path, status)
        self._reply(status, data, resp_headers, reason)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle


# --------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------


class GcsEmulator:
    """gcp-storage-emulator (subprocess, in memory) behind the fixing / fault-injecting proxy.

    ``tls_port`` / ``http_port`` default to 443 / 80, where TF's gs:// reaches them inside the
    sandbox; pass 0 for free ports (then only STORAGE_EMULATOR_HOST clients can use it).
    """

    def __init__(
        self,
        buckets: Iterable[str] = (),
        *,
        tls_port: int = 443,
        http_port: int = 80,
        client_port: int = 0,
        host: str = "127.0.0.1",
        project: str = TEST_PROJECT,
        startup_timeout: float = 30.0,
    ):
        self.host = host
        self.project = project
        self._want_ports = {"tls": tls_port, "http": http_port, "client": client_port}
        self._initial_buckets = list(buckets)
        self._startup_timeout = startup_timeout
        self._lock = threading.Lock()  # rules and log
        self._upstream_lock = threading.Lock()  # the emulator is single-threaded: one request at a time
        self._rules: list[_Rule] = []
        self._log_entries: list[LoggedRequest] = []
        self._sessions: dict[str, tuple[str, str, dict]] = {}  # upload_id -> (bucket, object, preconditions)
        # Requests per listener: "tls" (:443), "http" (:80), "client" (STORAGE_EMULATOR_HOST port).
        self.requests_by_listener: collections.Counter[str] = collections.Counter()
        # Give TLS clients https:// resumable-upload Locations (as GCS does); False keeps the emulator's http://.
        self.https_locations = True
        # How often each fix was applied: dechunked, empty_media, storage_layout, precondition_failed.
        self.fixups: collections.Counter[str] = collections.Counter()
        self._servers: dict[str, _ProxyServer] = {}
        self._threads: list[threading.Thread] = []
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.workdir: str | None = None
        self.ca_file: str | None = None
        self.emulator_port: int | None = None
        self.emulator_log: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> GcsEmulator:
        if self._proc is not None:
            return self
        try:
            self.workdir = tempfile.mkdtemp(prefix="gcs-harness-")
            self.ca_file, cert, key = make_certificates(self.workdir)
            self._start_emulator()
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(cert, key)
            tls.set_alpn_protocols(["http/1.1"])
            for name, port in self._want_ports.items():
                if name == "tls" and port is None:
                    continue
                try:
                    server = _ProxyServer((self.host, port), self, tls if name == "tls" else None, name)
                except OSError as err:
                    raise RuntimeError(
                        f"GCS test proxy cannot listen on {self.host}:{port} ({err}); "
                        f"is another GcsEmulator running in this network namespace? ({SANDBOX_HINT})"
                    ) from err
                self._servers[name] = server
                thread = threading.Thread(target=server.serve_forever, name=f"gcs-proxy-{name}", daemon=True)
                thread.start()
                self._threads.append(thread)
            for bucket in self._initial_buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        self._servers.clear()
        self._threads.clear()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.workdir and os.environ.get("GCS_HARNESS_KEEP") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _start_emulator(self) -> None:
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.emulator_port = s.getsockname()[1]
        self.emulator_log = os.path.join(self.workdir, "emulator.log")
        self._log_file = open(self.emulator_log, "wb")  # noqa: SIM115 (closed in stop())
        cmd = [sys.executable, "-c", _EMULATOR_LAUNCHER, "start", "--host", self.host,
               "--port", str(self.emulator_port), "--in-memory"]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )  # fmt: skip
        deadline = time.monotonic() + self._startup_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                status, _ = self._direct("GET", "/")
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gcp-storage-emulator did not answer within {self._startup_timeout}s")
            time.sleep(0.05)

    def _log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.emulator_log, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    # -- addresses and environment -----------------------------------------------------------

    def _port(self, name: str) -> int:
        return self._servers[name].server_address[1]

    @property
    def endpoint(self) -> str:
        """Plain-HTTP endpoint for STORAGE_EMULATOR_HOST clients (through the proxy)."""
        return f"http://{self.host}:{self._port('client')}"

    @property
    def tls_port(self) -> int:
        return self._port("tls")

    @property
    def http_port(self) -> int:
        return self._port("http")

    def env(self, *, tf_fast_retries: bool = False) -> dict[str, str]:
        """Variables a subprocess needs to use this storage with TF's gs:// and google-cloud-storage.

        google-cloud-storage (>= 2.x) uses anonymous credentials by itself when
        STORAGE_EMULATOR_HOST is set. ``tf_fast_retries`` shortens TF's GCS retry backoff (default
        1 s initial, doubling) to 10 ms initial / 100 ms max, for fault tests.
        """
        env = {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "CURL_CA_BUNDLE": self.ca_file,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": TEST_TOKEN,
            "NO_GCE_CHECK": "true",
            "GOOGLE_CLOUD_PROJECT": self.project,
        }
        if tf_fast_retries:
            env["GCS_RETRY_CONFIG_INIT_DELAY_TIME_US"] = "10000"
            env["GCS_RETRY_CONFIG_MAX_DELAY_TIME_US"] = "100000"
        return env

    @contextlib.contextmanager
    def environ(self, **kwargs) -> Iterator[dict[str, str]]:
        """Temporarily set :meth:`env` in ``os.environ`` (for in-process google-cloud-storage)."""
        new = self.env(**kwargs)
        old = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
        try:
            yield new
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self):
        """A google-cloud-storage Client talking to this storage (anonymous, through the proxy)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )

    # -- faults ------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503, methods=None, path_contains=None, message=None) -> None:
        """The next ``n`` matching requests get ``status`` with a GCS-style JSON error body."""
        self._add(_Rule("fail", remaining=n, status=status, methods=methods, path_contains=path_contains,
                        message=message))  # fmt: skip

    def drop_next(self, n: int = 1, methods=None, path_contains=None) -> None:
        """The next ``n`` matching requests get no answer: the connection is closed (a network error)."""
        self._add(_Rule("drop", remaining=n, status=0, methods=methods, path_contains=path_contains))

    def delay_next(self, n: int = 1, seconds: float = 1.0, methods=None, path_contains=None) -> None:
        """The next ``n`` matching requests are held ``seconds`` before being served (timeouts)."""
        self._add(_Rule("delay", remaining=n, status=0, methods=methods, path_contains=path_contains, delay=seconds))

    def deny(self, status: int = 403, path_contains=None, methods=None, message=None) -> None:
        """Every matching request gets ``status`` until :meth:`allow` or :meth:`reset`."""
        self._add(_Rule("deny", remaining=None, status=status, methods=methods, path_contains=path_contains,
                        message=message))  # fmt: skip

    def allow(self) -> None:
        """Remove every :meth:`deny` rule."""
        with self._lock:
            self._rules = [r for r in self._rules if r.kind != "deny"]

    def reset(self) -> None:
        """Remove every fault rule, clear the request log and counters (buckets and objects stay)."""
        with self._lock:
            self._rules.clear()
            self._log_entries.clear()
            self.fixups.clear()
            self.requests_by_listener.clear()

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _take_rules(self, methods: set[str], path: str) -> list[_Rule]:
        """Delay rules that apply, then at most one terminal rule (fail/drop/deny)."""
        taken = []
        with self._lock:
            for rule in list(self._rules):
                if not rule.matches(methods, path):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                taken.append(rule)
                if rule.kind != "delay":
                    break
        return taken

    # -- request log -------------------------------------------------------------------------

    def _count(self, fixup: str) -> None:
        with self._lock:
            self.fixups[fixup] += 1

    def _count_listener(self, name: str) -> None:
        with self._lock:
            self.requests_by_listener[name] += 1

    def _log(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._log_entries.append(LoggedRequest(method, path, status))

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Every request the proxy got since start / :meth:`reset`: (method, path, status)."""
        with self._lock:
            return list(self._log_entries)

    def requests(self, method=None, path_contains=None, status=None) -> list[LoggedRequest]:
        """The logged requests matching all the given filters."""
        return [
            r
            for r in self.request_log
            if (method is None or r.method == method)
            and (status is None or r.status == status)
            and (path_contains is None or path_contains in r.path or path_contains in urllib.parse.unquote(r.path))
        ]

    # -- direct access to the emulator (no proxy: no faults, not logged) ---------------------

    def _direct(self, method, path, body=None, headers=None, timeout=30.0):
        conn = http.client.HTTPConnection(self.host, self.emulator_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    @staticmethod
    def _object_path(bucket: str, name: str) -> str:
        return f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it exists)."""
        with self._upstream_lock:
            status, data = self._direct("POST", f"/storage/v1/b?project={self.project}", json.dumps({"name": name}),
                                        {"Content-Type": "application/json"})  # fmt: skip
        if status not in (200, 409):
            raise RuntimeError(f"create bucket {name}: HTTP {status} {data[:200]!r}")

    def delete_object(self, bucket: str, name: str) -> None:
        """Delete ``gs://bucket/name`` behind every client's back (KeyError if absent)."""
        with self._upstream_lock:
            status, data = self._direct("DELETE", self._object_path(bucket, name))
        if status == 404:
            raise KeyError(f"gs://{bucket}/{name}")
        if status not in (200, 204):
            raise RuntimeError(f"delete gs://{bucket}/{name}: HTTP {status} {data[:200]!r}")

    def put_object(self, bucket: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Create or replace ``gs://bucket/name`` with ``data`` (e.g. to corrupt a shard)."""
        body, ctype = _multipart(name, data, content_type)
        with self._upstream_lock:
            status, resp = self._direct("POST", f"/upload/storage/v1/b/{bucket}/o?uploadType=multipart", body,
                                        {"Content-Type": ctype})  # fmt: skip
        if status != 200:
            raise RuntimeError(f"put gs://{bucket}/{name}: HTTP {status} {resp[:200]!r}")

    def get_object(self, bucket: str, name: str) -> bytes:
        """The bytes of ``gs://bucket/name`` (KeyError if absent)."""
        with self._upstream_lock:
            status, data = self._direct("GET", self._object_path(bucket, name) + "?alt=media")
        if status == 404:
            raise KeyError(f"gs://{bucket}/{name}")
        if status != 200:
            raise RuntimeError(f"get gs://{bucket}/{name}: HTTP {status}")
        return data

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects in ``bucket`` under ``prefix``, sorted."""
        query = urllib.parse.urlencode({"prefix": prefix}) if prefix else ""
        with self._upstream_lock:
            status, data = self._direct("GET", f"/storage/v1/b/{bucket}/o?{query}")
        if status != 200:
            raise RuntimeError(f"list gs://{bucket}/{prefix}: HTTP {status}")
        return sorted(item["name"] for item in json.loads(data).get("items") or [])

    def wipe(self) -> None:
        """Delete every object in every bucket (the buckets stay)."""
        with self._upstream_lock:
            self._direct("GET", "/wipe?keep-buckets=1")
            self._sessions.clear()

    # -- forwarding with fixes ---------------------------------------------------------------

    def _forward(self, method, path, headers, body, *, tls):
        """Forward one request to the emulator; returns (status, reason, headers, body)."""
        parts = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        headers = list(headers)

        # Fix 1: an empty media upload crashes the emulator -> the same as a zero-byte multipart upload.
        if method == "POST" and query.get("uploadType") == ["media"] and not body and "name" in query:
            ctype = _header(headers, "Content-Type") or "application/octet-stream"
            if ctype.startswith("application/x-www-form-urlencoded"):  # curl's default for an empty POST
                ctype = "application/octet-stream"
            body, multipart_type = _multipart(query["name"][0], b"", ctype)
            query["uploadType"] = ["multipart"]
            path = urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(query, doseq=True), ""))
            headers = [(k, v) for k, v in headers if k.lower() != "content-type"] + [("Content-Type", multipart_type)]
            self._count("empty_media")
        if method in ("POST", "PUT", "PATCH") or body:
            body = body or b""  # http.client adds Content-Length (never chunked)
        json_type = [("Content-Type", "application/json; charset=UTF-8")]

        # Fix 2: bucket storageLayout (TF asks before renaming a directory); the emulator has no such route.
        segments = parts.path.split("/")
        if method == "GET" and len(segments) == 6 and parts.path.startswith("/storage/v1/b/") \
                and segments[5] == "storageLayout":  # fmt: skip
            with self._upstream_lock:
                status, _ = self._direct("GET", f"/storage/v1/b/{segments[4]}")
            if status != 200:
                return 404, "Not Found", json_type, gcs_error_body(404, "The specified bucket does not exist.")
            self._count("storage_layout")
            layout = {"kind": "storage#storageLayout", "bucket": urllib.parse.unquote(segments[4]), "location": "US",
                      "locationType": "multi-region", "hierarchicalNamespace": {"enabled": False}}  # fmt: skip
            return 200, "OK", json_type, json.dumps(layout).encode()

        with self._upstream_lock:
            failed = self._check_preconditions(method, parts.path, query, body, headers)
            if failed is not None:
                self._count("precondition_failed")
                return 412, "Precondition Failed", json_type, failed
            conn = http.client.HTTPConnection(self.host, self.emulator_port, timeout=120)
            try:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request(method, path, body=body, headers=dict(headers))
                resp = conn.getresponse()
                status, reason, resp_headers, data = resp.status, resp.reason, resp.getheaders(), resp.read()
            except (http.client.HTTPException, OSError) as err:
                log.error("emulator failed on %s %s: %s (see %s)", method, path, err, self.emulator_log)
                return (
                    502,
                    "Bad Gateway",
                    json_type,
                    gcs_error_body(502, f"test emulator failed on {method} {path}: {err}"),
                )
            finally:
                conn.close()
            self._track_session(method, parts.path, query, body, headers, status, resp_headers)

        out = []
        for name, value in resp_headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in ("server", "date"):
                continue
            if lower == "location" and tls and self.https_locations and value.startswith("http://"):
                value = "https://" + value[len("http://") :]
            out.append((name, value))
        return status, reason, out, data

    # Preconditions: GCS's ifGenerationMatch / ifGenerationNotMatch, which the emulator ignores.

    def _target_object(self, method, path, query, body, headers):
        """(bucket, object) a request with preconditions is about, or None."""
        segments = path.split("/")
        # /upload/storage/v1/b/B/o?uploadType=...
        if path.startswith("/upload/storage/v1/b/") and len(segments) == 7 and segments[6] == "o":
            bucket = segments[5]
            if "upload_id" in query:
                session = self._sessions.get(query["upload_id"][0])
                return session[:2] if session else None
            name = query.get("name", [None])[0]
            if name is None:
                name = _name_from_body(body, _header(headers, "Content-Type") or "")
            return (bucket, name) if name else None
        for prefix in ("/storage/v1/b/", "/b/"):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            if len(rest) < 3 or rest[1] != "o":
                return None
            for verb in ("copyTo", "rewriteTo"):  # preconditions apply to the destination
                if verb in rest:
                    i = rest.index(verb)
                    return rest[i + 2], urllib.parse.unquote("/".join(rest[i + 4 :]))
            if rest[-1] == "compose":
                return rest[0], urllib.parse.unquote("/".join(rest[2:-1]))
            return rest[0], urllib.parse.unquote("/".join(rest[2:]))
        return None

    def _check_preconditions(self, method, path, query, body, headers):
        conds = {k: query[k][0] for k in ("ifGenerationMatch", "ifGenerationNotMatch") if k in query}
        if not conds and "upload_id" in query:
            session = self._sessions.get(query["upload_id"][0])
            conds = session[2] if session else {}
        if not conds:
            return None
        target = self._target_object(method, path, query, body, headers)
        if target is None:
            return None
        status, data = self._direct("GET", self._object_path(*target))
        generation = json.loads(data).get("generation") if status == 200 else "0"
        ok = True
        if "ifGenerationMatch" in conds and str(conds["ifGenerationMatch"]) != str(generation):
            ok = False
        if "ifGenerationNotMatch" in conds and str(conds["ifGenerationNotMatch"]) == str(generation):
            ok = False
        if ok:
            return None
        if status != 200 and method in ("GET", "DELETE") and "ifGenerationMatch" in conds:
            return None  # let the emulator answer 404 for a missing object
        return gcs_error_body(412, "At least one of the pre-conditions you specified did not hold.")

    def _track_session(self, method, path, query, body, headers, status, resp_headers):
        if "upload_id" in query:
            if status in (200, 201, 404, 412):
                self._sessions.pop(query["upload_id"][0], None)
            return
        if query.get("uploadType") != ["resumable"] or status != 200:
            return
        conds = {k: query[k][0] for k in ("ifGenerationMatch", "ifGenerationNotMatch") if k in query}
        location = _header(resp_headers, "Location")
        target = self._target_object(method, path, query, body, headers)
        if conds and location and target:
            upload_id = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query).get("upload_id", [None])[0]
            if upload_id:
                self._sessions[upload_id] = (*target, conds)


def _header(headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None


def _multipart(name: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    boundary = "gcs-test-" + uuid.uuid4().hex
    meta = json.dumps({"name": name, "contentType": content_type}).encode()
    body = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode()
        + meta
        + f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/related; boundary={boundary}"


def _name_from_body(body: bytes, content_type: str) -> str | None:
    try:
        if content_type.startswith("application/json") and body:
            return json.loads(body).get("name")
        if content_type.startswith("multipart/"):
            msg = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
            return json.loads(msg.get_payload()[0].get_payload()).get("name")
    except (ValueError, IndexError, AttributeError, TypeError):
        return None
    return None


# Runs `python -m gcp_storage_emulator ARGS`, and exits when its parent (the harness) is gone.
_EMULATOR_LAUNCHER = """
import os, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""
