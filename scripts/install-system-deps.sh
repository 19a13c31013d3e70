#!/usr/bin/env bash
# Debian packages the tests use for real: an OCI registry (docker-registry), PostgreSQL
# (throwaway clusters on 127.0.0.1 for the control plane's tests), Chromium (the dashboard's
# browser tests, driven by Playwright; never a downloaded browser) and Prometheus (promtool
# checks the control plane's /metrics).
# Installs what is missing when running as root (CI, fresh machines); otherwise says what to run.
set -euo pipefail

need=()
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "==> apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a registry on all interfaces with its default config; the tests run their
# own on 127.0.0.1, so stop the system one where a service manager started it.
for svc in docker-registry postgresql prometheus prometheus-node-exporter; do
  (systemctl stop "$svc" 2>/dev/null || service "$svc" stop 2>/dev/null || true) >/dev/null 2>&1
done
