"""Inside a new pod: set up its network, /etc/hosts and hostname, then exec the container command.

Run by the Job runner as ``python -S _podinit.py SPEC_JSON`` (standard library only, no site
packages: it starts in milliseconds), usually behind ``unshare --net --mount --uts`` so that it
is alone in fresh network, mount and UTS namespaces. The spec (JSON) holds:

- ``argv``: the container's command and arguments, already resolved; ``cwd``: working directory;
- ``tools`` (optional): absolute paths of ip, nsenter, mount, umount (the pod's PATH may differ);
- ``parent_pid``: the runner; the pod gets SIGKILL if the runner dies (no orphaned pods);
- ``hostname`` (optional): set in the private UTS namespace, like a pod's hostname;
- ``hosts_file`` (optional): bind-mounted over /etc/hosts in the private mount namespace;
- ``network`` (optional): ``hub_pid``, ``hub_if``, ``address``, ``prefix``, ``mac``: create a veth
  pair, give this end (``eth0``) the pod's address and plug the other end into the bridge
  ``br0`` of the hub namespace (the namespace of process ``hub_pid``).

The environment is the pod's, already resolved by the runner. Exit code 128 means the pod could
not start (Kubernetes reports a container that cannot run with 128 too).
"""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys

START_ERROR = 128


def _run(argv, stdin=None):
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _network(net, tool):
    hub = f"/proc/{net['hub_pid']}/ns/net"
    _run(
        [tool("ip"), "-batch", "-"],
        "link set lo up\n"
        f"link add eth0 address {net['mac']} type veth peer name {net['hub_if']} netns {net['hub_pid']}\n"
        f"addr add {net['address']}/{net['prefix']} dev eth0\n"
        "link set eth0 up\n",
    )
    _run([tool("nsenter"), f"--net={hub}", tool("ip"), "link", "set", net["hub_if"], "master", "br0", "up"])


def _hosts(path, tool):
    try:
        _run([tool("mount"), "--bind", path, "/etc/hosts"])
        return
    except RuntimeError:
        pass
    # /etc/hosts may be a bind mount of a deleted file (scripts/sandbox.sh makes one), which
    # cannot be mounted over: unmount it first (this pod's mount namespace only) ...
    try:
        _run([tool("umount"), "/etc/hosts"])
        _run([tool("mount"), "--bind", path, "/etc/hosts"])
        return
    except RuntimeError:
        pass
    # ... or, where that mount is locked (a user namespace), replace /etc by a directory of
    # links to the real entries (still reachable through a bind mount) plus our hosts file.
    root = os.path.dirname(path)
    real, etc = os.path.join(root, "real-etc"), os.path.join(root, "etc")
    os.makedirs(real, exist_ok=True)
    os.makedirs(etc, exist_ok=True)
    _run([tool("mount"), "--rbind", "/etc", real])
    for name in os.listdir(real):
        if name != "hosts":
            os.symlink(os.path.join(real, name), os.path.join(etc, name))
    with open(path) as src, open(os.path.join(etc, "hosts"), "w") as dst:
        dst.write(src.read())
    _run([tool("mount"), "--bind", etc, "/etc"])


def main():
    spec = json.loads(sys.argv[1])
    tools = spec.get("tools") or {}

    def tool(name):
        return tools.get(name, name)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the runner
        if os.getppid() != spec["parent_pid"]:
            return START_ERROR  # the runner is already gone
        if spec.get("network"):
            _network(spec["network"], tool)
        if spec.get("hosts_file"):
            _hosts(spec["hosts_file"], tool)
        if spec.get("hostname"):
            socket.sethostname(spec["hostname"])
        if spec.get("cwd"):
            os.chdir(spec["cwd"])
    except Exception as err:
        print(f"jobrunner: the pod could not start: {err}", file=sys.stderr, flush=True)
        return START_ERROR
    argv = spec["argv"]
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        print(f"jobrunner: cannot run {argv[0]!r}: {err.strerror}", file=sys.stderr, flush=True)
        return START_ERROR


if __name__ == "__main__":
    sys.exit(main())
