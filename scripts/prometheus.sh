#!/usr/bin/env bash
# Install the real Prometheus server, promtool and Pushgateway the observability tests run
# (Debian packages `prometheus` and `prometheus-pushgateway`: Prometheus 2.42, Pushgateway 1.5).
# The tests start their own servers on loopback with generated configurations; the packages'
# system services are not used (and are not started in containers without systemd).
# Idempotent: does nothing when the three commands are already on PATH.
set -euo pipefail

needed=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || needed+=(prometheus)
command -v prometheus-pushgateway >/dev/null 2>&1 || needed+=(prometheus-pushgateway)
[ ${#needed[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus.sh: apt-get not found; install ${needed[*]} (Prometheus 2.4x with promtool, Pushgateway 1.x) and put prometheus, promtool and prometheus-pushgateway on PATH" >&2
  exit 1
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "prometheus.sh: installing ${needed[*]} needs root (or sudo)" >&2; exit 1; }
  sudo=(sudo)
fi
echo "prometheus.sh: installing ${needed[*]} with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${needed[@]}" >/dev/null; then
  "${sudo[@]}" apt-get update >/dev/null
  "${sudo[@]}" apt-get install -y --no-install-recommends "${needed[@]}" >/dev/null
fi
for tool in prometheus promtool prometheus-pushgateway; do
  command -v "$tool" >/dev/null 2>&1 || { echo "prometheus.sh: $tool still missing after installing ${needed[*]}" >&2; exit 1; }
done
