#!/usr/bin/env bash
# Installs sqdist, its plugin packages (plugins/*) and the dev/test extras into a venv.
#   SQDIST_VENV   where the venv lives (default: .venv in the checkout)
# The third-party packages are installed once per venv (keyed on the files that
# list them); sqdist itself is re-installed (editable, no deps) every time, so a
# cached venv always points at this checkout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${SQDIST_VENV:-$root/.venv}
py=${PYTHON:-python3}
# pyproject.toml names torch/torchvision ranges; the exact versions installed (CI runs on them) are in constraints.txt
export PIP_CONSTRAINT="$root/scripts/constraints.txt"
stamp_src=$(cat "$root/pyproject.toml" "$root"/plugins/*/pyproject.toml "$root/scripts/install.sh" "$root/scripts/constraints.txt" | sha256sum | cut -c1-16)

# pip and setuptools print pages of deprecation notices while building the editable
# installs; show a command's output only when it fails
quietly() {
  local log
  log=$(mktemp)
  if ! "$@" > "$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "[install] failed: $*" >&2; return 1
  fi
  rm -f "$log"
}

# every plugin package under plugins/ (sqdist-pow2, sqdist-slb, ...), editable
plugins=()
for p in "$root"/plugins/*/pyproject.toml; do plugins+=(-e "$(dirname "$p")"); done

if [ ! -x "$venv/bin/python" ]; then
  echo "[install] creating venv $venv"
  "$py" -m venv "$venv"
fi
if [ "$(cat "$venv/.sqdist-deps" 2>/dev/null)" != "$stamp_src" ]; then
  echo "[install] installing dependencies (torch 2.14.1, timm, accelerate, deepspeed, wandb, mkdocs, ...)"
  quietly "$venv/bin/python" -m pip install -q --upgrade pip
  quietly "$venv/bin/python" -m pip install -q -e "$root[dev,deepspeed,wandb,onnx,docs,openvino]" "${plugins[@]}"
  echo "$stamp_src" > "$venv/.sqdist-deps"
fi
quietly "$venv/bin/python" -m pip install -q --no-deps -e "$root" "${plugins[@]}"
# data.name=fashion_mnist reads the idx files of Debian's dataset-fashion-mnist: as root, install
# it once if it is missing; without it only that dataset (and its tests) is unavailable
fashion=/usr/share/datasets/fashion-mnist
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! ls "$fashion"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz >/dev/null 2>&1; then
  echo "[install] installing dataset-fashion-mnist (data.name=fashion_mnist)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "[install] could not install dataset-fashion-mnist; data.name=fashion_mnist and its tests need it"
fi
# the compiled SQ kernels (csrc/): built once per source change into ~/.cache/sqdist/kernels
# (~20 s on 2 cores; ~3 s when cached), so no test pays for the build; never required
"$venv/bin/python" -m sqdist.quant.kernels._build cpu > /dev/null || echo "[install] CPU SQ kernels not built: sqdist uses the PyTorch reference"
echo "[install] ready: $venv"
