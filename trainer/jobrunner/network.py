"""Where pods run: one network namespace per pod joined by a bridge, or the runner's own network.

``PodNetwork`` (root, or unprivileged user namespaces): every pod is started behind
``unshare --net --mount --uts``; it gets its own loopback, an ``eth0`` with a stable address
per index (198.18.0.10 + index, RFC 2544's test range, only inside namespaces the runner makes)
plugged into the bridge ``br0`` of a private hub namespace, its hostname, and a private
/etc/hosts (bind-mounted in its mount namespace) naming every pod of the Job. Nothing is added
to the machine's own network namespace, and everything disappears with the processes.

The hub namespace is the node's side of the pod network: its bridge has the node's address
(198.18.0.1) and the runner's liveness probes connect from there to a pod's IP, as the kubelet's
do from the node. :meth:`PodNetwork.socket` hands out TCP sockets created by the hub process, so
they live in the hub's network namespace although the runner uses them (a socket keeps the
namespace it was created in; the hub passes it over a Unix socket, SCM_RIGHTS).

``HostNetwork``: pods share the runner's network and /etc/hosts; peer names do not resolve and
two pods cannot listen on one port. Enough for one-pod Jobs and for commands that need no peers.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

from trainer.errors import ConfigError

PODINIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_podinit.py")
SUBNET = ipaddress.IPv4Network("198.18.0.0/15")
FIRST_HOST = 10  # pod i gets SUBNET[FIRST_HOST + i]
NODE_ADDRESS = str(SUBNET[1])  # the hub's bridge: where probes come from, like the kubelet's node
_TOOLS = ("unshare", "nsenter", "ip", "mount", "umount")
#: The hub process: holds the Job's namespace and, for every byte on the Unix socket whose file
#: descriptor is its argument, sends
#: back a new TCP socket of its namespace; it ends when the runner's end closes (also if it dies).
_HUB_SCRIPT = """
import socket, sys
channel = socket.socket(fileno=int(sys.argv[1]))
print("ready", flush=True)
while channel.recv(1):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socket.send_fds(channel, [b"s"], [tcp.fileno()])
    tcp.close()
"""


@functools.cache
def namespace_mode() -> tuple[str | None, str]:
    """("root" | "userns" | None, why not): how this machine can make per-pod namespaces."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found (util-linux and iproute2 are needed)"

    def works(flags: list[str]) -> bool:
        try:
            return subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if os.geteuid() == 0 and works(["--net", "--mount", "--uts"]):
        return "root", ""
    if works(["--user", "--map-root-user", "--net", "--mount", "--uts"]):
        return "userns", ""
    return None, "cannot create network namespaces (not root and no unprivileged user namespaces)"


def _tool(name: str) -> str:
    return shutil.which(name) or name


def pod_address(index: int) -> str:
    return str(SUBNET[FIRST_HOST + index])


def pod_mac(index: int) -> str:
    """Stable per index, so peers' ARP caches stay right when a pod is replaced."""
    n = FIRST_HOST + index
    return "02:6a:72:" + ":".join(f"{(n >> s) & 0xFF:02x}" for s in (16, 8, 0))


def hosts_file(entries: Sequence[tuple[str, Sequence[str]]], comment: str) -> str:
    lines = [
        f"# {comment}",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        "fe00::0\tip6-localnet",
        "fe00::1\tip6-allnodes",
        "fe00::2\tip6-allrouters",
    ]
    lines += [f"{address}\t{' '.join(names)}" for address, names in entries if names]
    return "\n".join(lines) + "\n"


class HostNetwork:
    """Pods share the runner's network; no private hosts file."""

    name = "host"
    isolated = False

    def start(self) -> None:
        pass

    def address(self, index: int) -> str:
        return "127.0.0.1"

    def socket(self) -> socket.socket:
        """A TCP socket that reaches the pods (here: this machine's own network)."""
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def command(self, spec: dict, pod_seq: int) -> list[str]:
        spec = {k: v for k, v in spec.items() if k not in ("hosts_file", "hostname")}
        return [sys.executable, "-I", "-S", PODINIT, json.dumps(spec)]

    def close(self) -> None:
        pass


class PodNetwork:
    """One network + mount + UTS namespace per pod, bridged in a private hub namespace."""

    name = "pod"
    isolated = True

    def __init__(self, mode: str | None = None):
        if mode is None:
            mode, why = namespace_mode()
            if mode is None:
                raise ConfigError(f"per-pod network namespaces are not available: {why}; use network='host'")
        self.mode = mode
        self.hub: subprocess.Popen | None = None
        self._channel: socket.socket | None = None  # the runner's end of the hub's socket factory
        self._channel_lock = threading.Lock()

    @property
    def _enter_user(self) -> list[str]:
        # Unprivileged: every namespace belongs to the hub's user namespace, where we are root.
        return [_tool("nsenter"), f"--user=/proc/{self.hub.pid}/ns/user", "--"] if self.mode == "userns" else []

    def start(self) -> None:
        user = ["--user", "--map-root-user"] if self.mode == "userns" else []
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._channel = ours
        with theirs:
            self.hub = subprocess.Popen(
                [*_hub_command(user), str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(theirs.fileno(),),
            )
        if self.hub.stdout.readline().strip() != "ready":
            err = self.hub.stderr.read() if self.hub.wait(timeout=10) is not None else ""
            raise ConfigError(f"could not create the Job's network namespace: {err.strip()}")
        setup = subprocess.run(
            [*self._enter_user, _tool("nsenter"), f"--net=/proc/{self.hub.pid}/ns/net", _tool("ip"), "-batch", "-"],
            input=f"link set lo up\nlink add br0 type bridge\naddr add {NODE_ADDRESS}/{SUBNET.prefixlen} dev br0\n"
            "link set br0 up\n",
            capture_output=True,
            text=True,
        )
        if setup.returncode != 0:
            self.close()
            raise ConfigError(f"could not create the Job's bridge: {setup.stderr.strip()}")

    def address(self, index: int) -> str:
        return pod_address(index)

    def socket(self) -> socket.socket:
        """A TCP socket of the hub's (the node's) network namespace: it reaches every pod's IP."""
        with self._channel_lock:
            if self._channel is None:
                raise ConnectionError("the Job's network is closed")
            self._channel.sendall(b"s")
            _, fds, _, _ = socket.recv_fds(self._channel, 1, 1)
        if not fds:
            raise ConnectionError("the Job's network namespace is gone")
        return socket.socket(fileno=fds[0])

    def command(self, spec: dict, pod_seq: int) -> list[str]:
        index = spec["index"]
        spec = dict(spec)
        spec["network"] = {
            "hub_pid": self.hub.pid,
            "hub_if": f"v{pod_seq}",
            "address": pod_address(index),
            "prefix": SUBNET.prefixlen,
            "mac": pod_mac(index),
        }
        spec["tools"] = {tool: _tool(tool) for tool in _TOOLS}  # the pod's PATH may not have them
        return [
            *self._enter_user,
            _tool("unshare"),
            "--net",
            "--mount",
            "--uts",
            "--",
            sys.executable,
            "-I",
            "-S",
            PODINIT,
            json.dumps(spec),
        ]

    def close(self) -> None:
        if self.hub is None:
            return
        with self._channel_lock:
            self._channel.close()  # the hub's loop reads end-of-stream and exits
            self._channel = None
        try:
            self.hub.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.hub.kill()
            self.hub.wait()
        self.hub.stdout.close()
        self.hub.stderr.close()
        self.hub = None


def _hub_command(user: list[str]) -> list[str]:
    return [_tool("unshare"), *user, "--net", "--", sys.executable, "-I", "-S", "-c", _HUB_SCRIPT]


def make_network(kind: str | HostNetwork | PodNetwork) -> HostNetwork | PodNetwork:
    """``auto`` = per-pod namespaces when possible, else the host network; objects pass through."""
    if isinstance(kind, HostNetwork | PodNetwork):
        return kind
    if kind == "host":
        return HostNetwork()
    if kind == "pod":
        return PodNetwork()
    if kind == "auto":
        return PodNetwork() if namespace_mode()[0] else HostNetwork()
    raise ConfigError(f"network must be auto, pod or host, not {kind!r}")
