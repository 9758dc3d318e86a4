#!/usr/bin/env bash
# Every check that needs a GPU, in one run, for a node with NVIDIA GPUs (an NGC image, or any Python with a
# CUDA build of torch and this project's dependencies): what the machine has, the GPU-marked tests (the TE
# spec against the local spec, Gemma-2 on TE, the Trainer in fp32 and bf16, the GRPO stage in bf16, the
# dynamic inference engine), the single-GPU MFU benchmark (bf16 and FP8) and the trainer-vs-transformers step
# benchmark in bf16 (0.9B).
#   bash scripts/gpu_check.sh [OUT_DIR]      (default runs/gpu_check; PYTHON=... picks the interpreter;
#                                             PART_TIMEOUT=SECONDS stops a part that runs longer;
#                                             STRICT=1 fails on anything skipped: see below)
# Each part writes its log (and JSON) under OUT_DIR and the script goes on after a failure; the exit status
# is the number of parts that failed. Without CUDA every part skips cleanly and says so. A skip is not a
# pass, though: on a node that should run everything (an NGC image with TE, flash-attn and a Hopper GPU for
# FP8), STRICT=1 adds a part that fails when a GPU test or a benchmark precision was skipped.
set -uo pipefail
out=${1:+$(realpath -m "$1")}  # relative to where it was called from
cd "$(dirname "$0")/.." || exit 1
out=${out:-runs/gpu_check}
py=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x "$py" ]; then py=python3; fi  # no venv here: the machine's Python
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NVIDIA_TF32_OVERRIDE=0
failed=0

part() {  # part NAME COMMAND...: run it, keep its output in OUT_DIR/NAME.log, count a failure
  local name=$1
  shift
  echo "== $name: $*"
  local began=$SECONDS
  local limit=()
  if [ -n "${PART_TIMEOUT:-}" ] && [ "$(type -t "$1")" = file ]; then  # not the shell functions (quick)
    limit=(timeout --kill-after=15 "$PART_TIMEOUT")
  fi
  if "${limit[@]}" "$@" >"$out/$name.log" 2>&1; then
    echo "== $name: ok in $((SECONDS - began)) s"
    tail -n 15 "$out/$name.log"
  else
    echo "== $name: FAILED (exit $?) in $((SECONDS - began)) s; the end of $out/$name.log:"
    tail -n 40 "$out/$name.log"
    failed=$((failed + 1))
  fi
}

# shellcheck disable=SC2317  # called through part
environment() {  # what this node has: torch and CUDA, the GPUs, the optional GPU libraries
  "$py" - <<'PY'
import importlib.util, shutil, subprocess, torch
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| CUDA available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
for name in ("megatron.core", "transformer_engine", "flash_attn", "flash_attn_interface", "apex", "nvidia.dali",
             "transformers"):
    found = importlib.util.find_spec(name.split(".")[0]) is not None and importlib.util.find_spec(name) is not None
    print(name + ": " + ("present" if found else "absent"))
from megatron_grm.rollout.dynamic_backend import NO_FLASH_ATTN, missing_runtime
missing = missing_runtime()
if missing == NO_FLASH_ATTN:
    missing = "flash-attn absent: torch paged attention, rollout.backend=dynamic only"
print("dynamic inference engine: " + (missing or "usable (flash-attn)"))
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
PY
}

part environment environment
part gpu_tests "$py" -m pytest -m gpu -n 0 -v -rs -p no:cacheprovider tests
part gpu_mfu "$py" bench/gpu_mfu.py --json "$out/gpu_mfu.json"
if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  # A 0.9B Llama shape at 4 x 2048 tokens: large enough that neither side is bound by kernel launches.
  part train_step_bf16 "$py" bench/train_step.py --dtype bf16 --layers 16 --hidden 2048 --ffn 5632 --heads 16 \
    --kv-heads 8 --seq 2048 --batch 4 --steps 6 --warmup 2 --matmul-n 8192 --json "$out/train_step_bf16.json"
else
  echo "== train_step_bf16: no CUDA device, skipped (bench/train_step.py --clock cpu measures the CPU path)"
fi
# shellcheck disable=SC2317  # called through part
nothing_skipped() {  # STRICT: every GPU test ran and every benchmark precision was measured
  local skipped
  skipped=$(grep -h "SKIPPED" "$out/gpu_tests.log" 2>/dev/null)
  if grep -q '"skipped"' "$out/gpu_mfu.json" 2>/dev/null; then
    skipped+=$'\n'"gpu_mfu.json: a precision was skipped: $(grep -o '"skipped": *"[^"]*"' "$out/gpu_mfu.json" | head -1)"
  fi
  if [ -n "${skipped//[$'\n ']/}" ]; then
    echo "STRICT=1: skipped where everything should run:"
    echo "$skipped"
    return 1
  fi
  echo "nothing was skipped"
}

if [ -n "${STRICT:-}" ]; then
  part strict nothing_skipped
fi
echo "== $failed part(s) failed; logs in $out"
exit "$failed"
