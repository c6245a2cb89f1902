#!/usr/bin/env bash
# Installs everything the tests need and runs them: bash scripts/test.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install.sh"
venv=${SQDIST_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
