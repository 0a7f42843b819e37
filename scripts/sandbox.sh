#!/usr/bin/env bash
# Run a command in a private network + mount namespace in which the Google Cloud Storage host
# names resolve to loopback, so TensorFlow's native gs:// filesystem (fixed endpoints
# https://www.googleapis.com and https://storage.googleapis.com) reaches the test emulator that
# tests/support/gcs.py starts on 127.0.0.1:443/:80. Nothing leaves the machine: the namespace
# has only its own loopback interface.
#
#   scripts/sandbox.sh COMMAND [ARGS...]
#   scripts/sandbox.sh .venv/bin/python -m pytest -q tests/support
#
# Inside: `lo` is up; /etc/hosts is a private copy (bind-mounted, only for this namespace) that
# maps www.googleapis.com and storage.googleapis.com to 127.0.0.1 and keeps localhost and this
# machine's name; NO_GCE_CHECK=true (TF skips the metadata-server probe) and
# VGG_TRAINER_SANDBOX=1 are exported. Every process started inside (pytest and the trainer
# processes it spawns) shares this view; the rest of the machine is not affected.
# Needs root, or unprivileged user namespaces (then it maps the caller to root in a user namespace).
# Already inside the sandbox, it just runs COMMAND. The exit status is COMMAND's.
set -euo pipefail

STORAGE_HOSTS="www.googleapis.com storage.googleapis.com"

die() {
  echo "sandbox.sh: $*" >&2
  exit 1
}

[ $# -gt 0 ] || die "usage: scripts/sandbox.sh COMMAND [ARGS...]"

if [ "${_VGG_SANDBOX_STAGE:-}" = inner ]; then
  unset _VGG_SANDBOX_STAGE
  # 1. Bring up loopback in the new network namespace.
  if command -v ip >/dev/null 2>&1; then
    ip link set lo up
  else
    python3 - <<'PY'
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, struct.pack("16sH14s", b"lo", 0, b"")))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))  # SIOCSIFFLAGS |= IFF_UP
PY
  fi
  # 2. A private /etc/hosts: the machine's entries minus any for the storage hosts, plus ours.
  hosts=$(mktemp "${TMPDIR:-/tmp}/sandbox-hosts.XXXXXX")
  {
    echo "# private hosts file of scripts/sandbox.sh (this mount namespace only)"
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    if [ -r /etc/hosts ]; then
      grep -v -E '(^|[[:space:]])(www|storage)\.googleapis\.com([[:space:]]|$)' /etc/hosts || true
    fi
    name=$(hostname 2>/dev/null || true)
    if [ -n "$name" ] && ! grep -q -E "[[:space:]]${name//./\\.}([[:space:]]|$)" /etc/hosts 2>/dev/null; then
      echo "127.0.0.1 $name"
    fi
    echo "127.0.0.1 $STORAGE_HOSTS"
  } >"$hosts"
  chmod 644 "$hosts"
  mount --bind "$hosts" /etc/hosts
  rm -f "$hosts" # the bind mount keeps the file alive until the namespace ends
  export NO_GCE_CHECK=true
  export VGG_TRAINER_SANDBOX=1
  exec "$@"
fi

# Already inside a sandbox: nothing to do.
if [ "${VGG_TRAINER_SANDBOX:-}" = 1 ] \
  && getent hosts storage.googleapis.com 2>/dev/null | grep -q '^127\.0\.0\.1[[:space:]]'; then
  exec "$@"
fi

command -v unshare >/dev/null 2>&1 || die "unshare (util-linux) is not installed; it is needed to build the private network namespace for the GCS tests"

self=$(readlink -f "$0")
flags=()
if [ "$(id -u)" = 0 ] && unshare --mount --net --fork true 2>/dev/null; then
  flags=(--mount --net)
elif unshare --user --map-root-user --mount --net --fork true 2>/dev/null; then
  flags=(--user --map-root-user --mount --net)
elif [ "$(id -u)" = 0 ]; then
  die "cannot create a private network namespace: 'unshare --mount --net' fails even as root (no CAP_SYS_ADMIN?) and user namespaces are unavailable"
else
  die "cannot create a private network namespace: neither root nor unprivileged user namespaces are available (run as root, or enable user namespaces, e.g. sysctl kernel.unprivileged_userns_clone=1)"
fi
# --kill-child: if unshare itself is killed, the command goes too (it implies --fork).
_VGG_SANDBOX_STAGE=inner exec unshare "${flags[@]}" --kill-child -- bash "$self" "$@"
