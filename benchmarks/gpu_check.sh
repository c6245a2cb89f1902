#!/usr/bin/env bash
# The GPU check (issues 17 and 35), in one go, in under 10 minutes; everything it keeps goes under $OUT:
#   gpu.json       the summary: device, torch, test counts, every figure, each step's outcome
#   gpu_check.log  one line per step, the table, and the tail of each failing step's log
#   logs.tar.gz    every step's full log and raw output (junit, benchmark JSON, run summaries)
# (three files: the device machine brings back at most eight.)
#
# Steps, each bounded by `timeout` and by what is left of the budget ($GPU_CHECK_BUDGET_S,
# default 540 s), in the order of what matters most; a failing step is recorded and the
# script goes on:
#   env         python/torch/device (+ nvidia-smi)
#   build_cpu   the CPU SQ op (the GPU's kernels are Triton's: compiled by Triton on first use)
#   triton_tests  tests marked triton (tests/quant/test_triton.py) natively on CUDA tensors (junit)
#   tests       tests/quant/test_kernels.py + tests/test_dist.py (junit), then every other test marked gpu
#   triton_kernels  benchmarks/triton_kernels.py --json: each Triton kernel against its PyTorch
#               reference and against the measured copy bandwidth
#   methods_r50 benchmarks/method_speed.py: a resnet50 224x224 training step with every method
#   kernels     benchmarks/kernels.py --device cuda --json: GB/s against the measured copy bandwidth
#   throughput  benchmarks/throughput.py --json: resnet50, batch 128, 224x224, bf16, channels_last
#   digits_*    recipes/digits_sq_twn.yaml with fused and with reference kernels (top-1, SQ share
#               of the step time), compiled (train.compile=true, inductor: digits_compiled), then bf16,
#               fp16 and the fp16 kill-and-resume side by side
#   compile_*   tests/train/test_compile.py (junit), then benchmarks/compile_speed.py on the GPU: resnet18
#               32x32 b64 through the trainer, compiled vs eager, FP / TWN / W4A4 LSQ, and inductor's
#               value differences (compile_speed.json)
#   fsdp2_bf16  the digits recipe under engine.name=fsdp2 (fully_shard, NCCL, bf16), one process per GPU
#   summary     $OUT/gpu.json (benchmarks/gpu_check.py summary)
#
# Usage, from anywhere:
#   OUT=/some/dir bash benchmarks/gpu_check.sh                   # a CUDA machine; stops at once without one
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --cpu-dry-run        # the same steps on the CPU, tiny settings
#                                                                # (or SQDIST_GPU_CHECK_CPU=1): tests the plumbing
# Python: $PYTHON, else $SQDIST_VENV/bin/python, else .venv/bin/python, else python3 (torch, timm,
# accelerate, safetensors, pytest; sqdist is imported from this checkout).
# The committed copy of a real run's summary is benchmarks/results/gpu.json (copied from $OUT by hand).
set -uo pipefail
start_all=$(date +%s)
root=$(cd "$(dirname "$0")/.." && pwd)
dry=${SQDIST_GPU_CHECK_CPU:-0}
for arg in "$@"; do
  case $arg in
    --cpu-dry-run) dry=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; allowed: --cpu-dry-run" >&2; exit 2 ;;
  esac
done
[ "$dry" = 0 ] || dry=1
out=${OUT:-$root/gpu-check}
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/sqdist-gpu-check.XXXXXX")
py=${PYTHON:-}
for cand in ${SQDIST_VENV:+"$SQDIST_VENV/bin/python"} "$root/.venv/bin/python" "$(command -v python3)"; do
  [ -z "$py" ] && [ -x "$cand" ] && py=$cand
done
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SQDIST_KERNEL_CACHE=${SQDIST_KERNEL_CACHE:-/tmp/sqdist-kernels}  # the .so files stay out of $OUT
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export WANDB_MODE=offline WANDB_SILENT=true
log=$out/gpu_check.log
: > "$log"
say() { echo "$*" | tee -a "$log"; }

budget=${GPU_CHECK_BUDGET_S:-540}  # seconds from the start; the summary's 30 s at most come on top
reserve=20  # a killed step's 5 s grace, and the archive
left() { echo $(( budget - reserve - ($(date +%s) - start_all) )); }

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, what is left), log to $work/NAME.log,
# and append {"name", "rc", "seconds", "timed_out", "cap_s"} to $work/steps.jsonl.
# With stdout_to=FILE set for the call, the command's stdout goes there (its stderr to the log);
# ok_rc="0 5" counts those exit codes as success.
step() {
  local name=$1 cap=$2; shift 2
  local avail; avail=$(left)
  [ "$avail" -lt "$cap" ] && cap=$avail
  if [ "$cap" -lt 5 ]; then
    echo "{\"name\": \"$name\", \"skipped\": true, \"note\": \"out of time\"}" >> "$work/steps.jsonl"
    say "[$name] skipped: out of time"
    return 0
  fi
  local t0 rc; t0=$(date +%s.%N)
  if [ -n "${stdout_to:-}" ]; then
    timeout -k 5 "$cap" "$@" > "$stdout_to" 2> "$work/$name.log"
  else
    timeout -k 5 "$cap" "$@" > "$work/$name.log" 2>&1
  fi
  rc=$?
  case " ${ok_rc:-0} " in *" $rc "*) [ $rc != 0 ] && echo "(exit code $rc counted as success)" >> "$work/$name.log"; rc=0 ;; esac
  local secs; secs=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")
  local to=false; { [ $rc = 124 ] || [ $rc = 137 ]; } && to=true
  echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"timed_out\": $to, \"cap_s\": $cap}" >> "$work/steps.jsonl"
  if [ $rc = 0 ]; then
    say "[$name] ok in $secs s"
  else
    say "[$name] FAILED (rc $rc$([ $to = true ] && echo ", timed out after $cap s")) in $secs s; last lines:"
    tail -n 15 "$work/$name.log" | sed 's/^/    /' | tee -a "$log"
  fi
}
skip() { echo "{\"name\": \"$1\", \"skipped\": true, \"note\": \"$2\"}" >> "$work/steps.jsonl"; say "[$1] skipped: $2"; }

# the summary, then the archive (no checkpoints or weights); exit 0 only when every step and test passed
finish() {
  timeout 30 "$py" benchmarks/gpu_check.py summary --work "$work" --out "$out/gpu.json" \
    --mode "$([ $dry = 1 ] && echo cpu-dry-run || echo gpu)" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  tar -czf "$out/logs.tar.gz" --exclude='*/checkpoints' --exclude='*.safetensors' --exclude='*.pt' -C "$work" . \
    2>/dev/null || say "could not archive $work"
  say "total $(( $(date +%s) - start_all )) s; summary $out/gpu.json; logs $out/logs.tar.gz (work folder $work)"
  return "$rc"
}

# ---- preflight: without CUDA stop at once (unless dry), saying why
if [ "$dry" = 0 ]; then
  nvidia-smi > "$work/nvidia-smi.txt" 2>&1 || say "nvidia-smi failed: $(head -c 300 "$work/nvidia-smi.txt")"
  if ! timeout 60 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>>"$log"; then
    say "FAIL: $py has no torch with a usable CUDA device. On a CPU machine run: bash benchmarks/gpu_check.sh --cpu-dry-run"
    exit 1
  fi
fi
say "gpu_check: mode $([ $dry = 1 ] && echo cpu-dry-run || echo gpu), python $py, budget $budget s, work $work"

# sizes: the real ones, or tiny ones for the CPU dry run
recipe=recipes/digits_sq_twn.yaml
if [ "$dry" = 1 ]; then
  digits=(train.progress=false train.max_steps=12 train.log_every=4 train.bn_recalibrate=2)
  mixed=(train.max_steps=4)  # bf16 convolutions crawl on a CPU
  resume=(train.max_steps=16 train.checkpoint_every=4 train.log_every=4 train.bn_recalibrate=2)  # + fp32
  kill_after=8
  half=fp32  # the kill-and-resume's precision: fp16 needs a GPU, and bf16 convolutions crawl on a CPU
  kern=(--device cpu --repeats 1 --warmup 1 --quantizers bwn,twn)  # kbit4: its CPU reference is slow
  thru=(--device cpu --model resnet18 --batch 4 --image-size 32 --steps 2 --warmup 1 --dtype fp32)
  tkern=(--device cpu --repeats 1 --warmup 1)  # tiny sizes in Triton's interpreter
  r50_rows="FP,TWN"  # a resnet50 step at 224x224 takes seconds on a CPU
  r50=(--r50-batch 2 --r50-steps 1)
else
  digits=(train.progress=false)  # the recipe as it is
  mixed=()
  resume=(train.max_steps=200 train.checkpoint_every=50 train.log_every=50 engine.mixed_precision=fp16)
  kill_after=100
  half=fp16
  kern=(--device cuda --repeats 10)
  thru=(--device cuda --model resnet50 --batch 128 --image-size 224 --steps 30 --warmup 10 --dtype bf16)
  tkern=(--device cuda --repeats 20)
  r50_rows=$("$py" benchmarks/method_speed.py --list 2>/dev/null | paste -sd, -)  # every method
  r50=(--r50-batch 32 --r50-steps 1)
fi

step env 60 "$py" benchmarks/gpu_check.py env --json "$work/env.json"
say "$(cat "$work/env.json" 2>/dev/null | tr -d '\n' | cut -c1-400)"

# ---- 1. build the CPU op (the cache keeps it for the steps after)
step build_cpu 120 "$py" -m sqdist.quant.kernels._build cpu

# ---- 2. tests: the Triton kernels natively (in the dry run: in the interpreter, which conftest selects
# without a GPU), the kernel and broadcast tests (CUDA ones run here), then the rest marked gpu
step triton_tests 150 "$py" -m pytest -q -rs -p no:cacheprovider -m triton tests/quant/test_triton.py \
  --junitxml="$work/junit-triton.xml"
step tests 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/quant/test_kernels.py tests/test_dist.py \
  --junitxml="$work/junit-kernels.xml"
ok_rc="0 5" step tests_gpu_marked 90 "$py" -m pytest -q -rs -p no:cacheprovider -m gpu tests \
  --ignore=tests/quant/test_kernels.py --ignore=tests/test_dist.py --junitxml="$work/junit-gpu.xml"  # 5: none collected

# ---- 3. each Triton kernel against its reference and the copy bandwidth; a resnet50 step with every method
stdout_to=$work/triton_kernels.json step triton_kernels 120 "$py" benchmarks/triton_kernels.py --json "${tkern[@]}"
stdout_to=$work/methods.json step methods_r50 180 "$py" benchmarks/method_speed.py --json --no-memory --rows FP \
  --steps 1 --rounds 1 --warmup 0 --r50-rows "$r50_rows" "${r50[@]}"

# ---- 4. the SQ step against the copy bandwidth
stdout_to=$work/kernels.json step kernels 120 "$py" benchmarks/kernels.py --json "${kern[@]}"

# ---- 5. training throughput: FP, QAT, SQ (fused and reference)
stdout_to=$work/throughput.json step throughput 180 "$py" benchmarks/throughput.py --json "${thru[@]}"

# ---- 6. the digits recipe on one device: fused vs reference kernels (one at a time: timed)
step digits_fused 120 env SQDIST_KERNELS=auto "$py" benchmarks/gpu_check.py train "$recipe" "${digits[@]}" \
  run.dir="$work/runs/fused" --json "$work/digits_fused.json"
step digits_reference 120 env SQDIST_KERNELS=reference "$py" benchmarks/gpu_check.py train "$recipe" "${digits[@]}" \
  run.dir="$work/runs/reference" --json "$work/digits_reference.json"

# ---- 6b. compiled (inductor on CUDA): the same recipe, its top-1 and step time beside digits_fused
step digits_compiled 150 env SQDIST_KERNELS=auto "$py" benchmarks/gpu_check.py train "$recipe" "${digits[@]}" \
  train.compile=true run.dir="$work/runs/compiled" --json "$work/digits_compiled.json"

# ---- 7. mixed precision: bf16, fp16 and the fp16 kill-and-resume side by side (accuracy and bits, not time)
step digits_bf16 150 "$py" benchmarks/gpu_check.py train "$recipe" "${digits[@]}" ${mixed[@]+"${mixed[@]}"} engine.mixed_precision=bf16 \
  run.dir="$work/runs/bf16" --json "$work/digits_bf16.json" &
if [ "$dry" = 0 ]; then
  step digits_fp16 150 "$py" benchmarks/gpu_check.py train "$recipe" "${digits[@]}" engine.mixed_precision=fp16 \
    run.dir="$work/runs/fp16" --json "$work/digits_fp16.json" &
else
  skip digits_fp16 "cpu dry run: fp16 needs a GPU"
fi
rt=$(( $(left) - 10 )); [ $rt -gt 170 ] && rt=170  # its own deadline, inside the step's: it still writes its JSON
step "resume_$half" 180 "$py" benchmarks/gpu_check.py kill-resume "$recipe" "${resume[@]}" \
  --work "$work/runs/resume" --kill-after $kill_after --timeout $rt \
  --json "$work/resume_$half.json" &
wait

# ---- 8. torch.compile: the trace tests, then compiled vs eager through the trainer on this device
step compile_tests 150 "$py" -m pytest -q -rs -p no:cacheprovider tests/train/test_compile.py --junitxml="$work/junit-compile.xml"
if [ "$dry" = 1 ]; then
  cspeed=(--rows FP,TWN --threads 1 --steps 2 --skip 1 --rounds 1 --no-values)
else
  cspeed=(--rows "FP,TWN,W4A4 LSQ" --threads 4 --steps 20 --skip 10 --rounds 1 --values-rows "TWN,W4A4 LSQ")
fi
step compile_speed 180 "$py" benchmarks/compile_speed.py "${cspeed[@]}" --json "$work/compile_speed.json"

# ---- 9. FSDP2 (engine.name=fsdp2, fully_shard) with SQ on NCCL in bf16 (issue 34): every GPU one process
# (torchrun when there are two or more; one GPU: a group of one); the dry run: 2 CPU processes on gloo, fp32
if [ "$dry" = 1 ]; then nproc_fsdp=2; fsdp_prec=(); else
  nproc_fsdp=$("$py" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
  fsdp_prec=(engine.mixed_precision=bf16)
fi
step fsdp2_bf16 150 "$py" -m torch.distributed.run --nproc_per_node "$nproc_fsdp" --master_port 29531 \
  benchmarks/gpu_check.py train "$recipe" "${digits[@]}" ${mixed[@]+"${mixed[@]}"} engine.name=fsdp2 ${fsdp_prec[@]+"${fsdp_prec[@]}"} \
  run.dir="$work/runs/fsdp2" --json "$work/digits_fsdp2.json"

finish
