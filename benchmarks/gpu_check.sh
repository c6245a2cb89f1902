#!/usr/bin/env bash
# GPU check of the fused SQ kernels, in one go: build the CUDA (and CPU) op, run
# tests/test_kernels.py (the CUDA tests run only here), run the benchmark with --json.
# Everything it writes goes under $OUT (default: ./gpu-check):
#   build.log build_s.txt  tests.log junit.xml  bench.json bench.err  nvidia-smi.txt  summary.txt
# Usage, from anywhere:  OUT=/some/dir bash benchmarks/gpu_check.sh
# Python: $PYTHON, else $SQDIST_VENV/bin/python, else .venv/bin/python, else python3 (needs torch
# with CUDA, timm and pytest; sqdist is imported from this checkout).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/gpu-check}
mkdir -p "$out"
py=${PYTHON:-}
for cand in ${SQDIST_VENV:+"$SQDIST_VENV/bin/python"} "$root/.venv/bin/python" "$(command -v python3)"; do
  [ -z "$py" ] && [ -x "$cand" ] && py=$cand
done
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export SQDIST_KERNEL_CACHE=${SQDIST_KERNEL_CACHE:-/tmp/sqdist-kernels}  # the .so files stay out of $OUT
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
note() { echo "$*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || note "nvidia-smi failed"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$out/summary.txt"; then
  note "FAIL: $py has no torch with a usable CUDA device"; exit 1
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee -a "$out/summary.txt"

# 1. build both ops (timed; a second run finds them in the cache)
start=$(date +%s)
if "$py" -m sqdist.kernels._build cpu cuda > "$out/build.log" 2>&1; then
  echo $(( $(date +%s) - start )) > "$out/build_s.txt"
  note "build: ok in $(cat "$out/build_s.txt") s"
else
  note "FAIL: build (see build.log)"; status=1
fi

# 2. the kernel tests, CUDA ones included
if timeout 900 "$py" -m pytest -q -rs tests/test_kernels.py --junitxml="$out/junit.xml" > "$out/tests.log" 2>&1; then
  note "tests: $(tail -n 1 "$out/tests.log")"
else
  note "FAIL: tests: $(tail -n 1 "$out/tests.log")"; status=1
fi

# 3. the benchmark: reference vs kernel on CPU and GPU, GB/s against the device's peak
if timeout 900 "$py" benchmarks/kernels.py --json --repeats "${REPEATS:-10}" > "$out/bench.json" 2> "$out/bench.err"; then
  note "bench: ok"
  "$py" - "$out/bench.json" <<'PY' | tee -a "$out/summary.txt"
import json, sys
rep = json.load(open(sys.argv[1]))
for dev, r in (rep.items() if "info" not in rep else [(rep["info"]["device"], rep)]):
    for name, v in r.items():
        if name != "info":
            extra = f"  {v['gbps']:.0f}/{v['peak_gbps']:.0f} GB/s ({v['gbps'] / v['peak_gbps']:.0%})" if "gbps" in v else ""
            print(f"{dev:5} {name:6} ref {v['reference_s'] * 1e3:9.2f} ms  kernel {v['kernel_s'] * 1e3:8.3f} ms  "
                  f"{v['speedup']:6.1f}x{extra}")
PY
else
  note "FAIL: benchmark (see bench.err)"; status=1
fi
exit $status
