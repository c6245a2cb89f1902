#!/usr/bin/env bash
# Installs everything the tests need and runs them: bash scripts/test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install.sh"
# The Slurm tests start a loopback cluster (slurm/cluster_up.sh); as root, install
# Debian's slurm-wlm and munge once (~25 s) if they are missing.
if [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null && command -v apt-get >/dev/null; then
  echo "[test] installing slurm-wlm and munge for the Slurm tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
    || echo "[test] could not install Slurm; its cluster tests will be skipped"
fi
venv=${SQDIST_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
