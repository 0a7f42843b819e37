"""Start-up check of a multi-worker cluster, with real sockets on loopback."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from trainer.errors import TransientError
from trainer.launch import free_ports
from trainer.rendezvous import probe, wait_for_peers


def test_workers_starting_at_different_times_all_get_through():
    workers = [f"localhost:{port}" for port in free_ports(3)]
    waited: dict[int, float] = {}
    done = threading.Event()

    def worker(index: int, delay: float) -> None:
        time.sleep(delay)
        waited[index] = wait_for_peers(workers, index, deadline_seconds=20)
        with socket.create_server(("localhost", int(workers[index].rsplit(":", 1)[1]))):  # TensorFlow's server
            done.wait(timeout=30)

    threads = [threading.Thread(target=worker, args=(i, 0.5 * i)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(waited) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(waited) == [0, 1, 2]
    assert waited[0] >= 0.5  # the first one waited for the last one to come up


def test_a_peer_that_never_starts_is_named_within_the_deadline():
    own, absent = free_ports(2)
    workers = [f"localhost:{own}", f"localhost:{absent}", "no-such-peer.invalid:2222"]
    started = time.monotonic()

    with pytest.raises(TransientError) as raised:
        wait_for_peers(workers, 0, deadline_seconds=1.5)

    assert time.monotonic() - started < 5
    message = str(raised.value)
    assert re.search(
        rf"2 of 2 peer\(s\) not reachable after 2 s: localhost:{absent} \(connection refused\), "
        r"no-such-peer\.invalid:2222 \(name does not resolve\)",
        message,
    ), message
    assert raised.value.exit_code == 75
    assert probe(f"localhost:{own}") is not None  # the port is free again for TensorFlow


def test_a_busy_worker_port_is_reported():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(TransientError, match=f"worker port {port} is busy"):
            wait_for_peers([f"localhost:{port}", "localhost:1"], 0, deadline_seconds=1)
