"""Start-up check of a multi-worker cluster: every peer's name resolves and its port answers.

Kubernetes starts a Job's pods in any order and DNS records appear a little after a pod
does. Without a check, TensorFlow either fails on a name that does not resolve yet or
waits a long time for a peer that will never come. So before building the strategy each
worker:

1. listens on its own worker port with a plain TCP socket (so peers can see it is up,
   before TensorFlow's own server exists: no worker waits for another's TensorFlow);
2. waits until every peer's host name resolves and its port accepts a connection;
3. closes its socket, leaving the port to TensorFlow.

A peer missing at the deadline ends the process with TRANSIENT (exit 75), naming the
peers and what failed for each: the Job retries, as a late scheduling is worth retrying.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence

from trainer.errors import TransientError

log = logging.getLogger(__name__)

_RETRY_SECONDS = 0.5


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = 1.0) -> str | None:
    """None when ``address`` accepts a TCP connection, else why not (a short phrase)."""
    host, port = split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return "name does not resolve"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
                return None
            except OSError as err:
                reason = "connection refused" if isinstance(err, ConnectionRefusedError) else type(err).__name__
    return reason


class _Beacon:
    """A bare TCP listener on this worker's port: accepts and closes, to say "I am up"."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.sock.family == socket.AF_INET6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::" if self.sock.family == socket.AF_INET6 else "", port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rendezvous-beacon", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def wait_for_peers(workers: Sequence[str], own_index: int, deadline_seconds: float) -> float:
    """Block until every other worker answers; returns the seconds waited.

    Raises TransientError naming the peers still missing at the deadline.
    """
    started = time.monotonic()
    _, own_port = split_address(workers[own_index])
    try:
        beacon = _Beacon(own_port)
    except OSError as err:
        raise TransientError(f"worker port {own_port} is busy ({err.strerror}); another process holds it") from None
    peers = [address for i, address in enumerate(workers) if i != own_index]
    missing: dict[str, str] = {}
    try:
        while True:
            missing = {address: why for address in peers if (why := probe(address)) is not None}
            if not missing:
                waited = time.monotonic() - started
                log.info("all %d peers answered after %.1f s", len(peers), waited)
                return waited
            if time.monotonic() - started > deadline_seconds:
                break
            time.sleep(_RETRY_SECONDS)
    finally:
        beacon.close()
    names = ", ".join(f"{address} ({why})" for address, why in missing.items())
    raise TransientError(
        f"{len(missing)} of {len(peers)} peer(s) not reachable after {deadline_seconds:.0f} s: {names}; "
        "check that every worker pod is scheduled and running (the Job retries)"
    )


def wait_for_peers_to_leave(workers: Sequence[str], own_index: int, deadline_seconds: float) -> float:
    """Block until no other worker's port answers (their processes ended); returns the seconds waited.

    The chief calls this last, so it exits after the others: a peer still running when the
    coordination service (hosted by the chief) goes away reports it as an error.
    """
    started = time.monotonic()
    peers = [address for i, address in enumerate(workers) if i != own_index]
    while time.monotonic() - started < deadline_seconds:
        if all(probe(address, timeout=0.5) is not None for address in peers):
            break
        time.sleep(0.1)
    else:
        log.warning("peers still up %.0f s after the final barrier; exiting anyway", deadline_seconds)
    return time.monotonic() - started
