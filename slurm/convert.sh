#!/bin/bash
# Hugging Face <-> Megatron checkpoint conversion, on one node's CPUs (no GPU is requested or used).
# The tools start their own TP*PP local worker processes (torch.distributed.run), so this is one task:
#   sbatch slurm/convert.sh hf_to_mcore --hf /models/gemma-2-27b --out /ckpt/gemma2-27b --tp 8 --pp 2 --dtype bf16
#   sbatch slurm/convert.sh mcore_to_hf --ckpt runs/grpo-1234/checkpoints --out /models/grm-27b-hf
# Options after the direction go to tools/convert_<direction>.py unchanged (docs/conversion.md).
#SBATCH --job-name=grm-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=02:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

# Slurm runs a spooled copy of this file: find the checkout from the submitted path (or GRM_REPO), asking a
# busy controller up to three times.
for _ in 1 2 3; do GRM_SCRIPT=$(scontrol show job -o "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' |
    cut -d= -f2-) && break; [[ -n "${SLURM_JOB_ID:-}" ]] || break; sleep 5; done
GRM_REPO=${GRM_REPO:-$(cd "$(dirname "${GRM_SCRIPT:-${BASH_SOURCE[0]}}")/.." && pwd)}
[[ -f "$GRM_REPO/slurm/common.sh" ]] || { echo "grm: no slurm/common.sh under GRM_REPO=$GRM_REPO:" \
    "export GRM_REPO=<the checkout> and resubmit" >&2; exit 1; }
# shellcheck source=slurm/common.sh
source "$GRM_REPO/slurm/common.sh"

direction=${1:-}
case $direction in
    hf_to_mcore | mcore_to_hf) shift ;;
    *) grm_die "usage: sbatch slurm/convert.sh hf_to_mcore|mcore_to_hf TOOL-OPTIONS... (got '${direction}')" ;;
esac
# Conversion is CPU work: hide any GPU so that every worker takes the CPU (gloo) path.
export CUDA_VISIBLE_DEVICES=""
# hf_to_mcore runs TP*PP worker processes on this task's CPUs (mcore_to_hf runs one): each worker gets
# its share as OMP_NUM_THREADS, not all of them, unless OMP_NUM_THREADS was exported before sbatch.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    workers=1
    if [[ $direction = hf_to_mcore ]]; then
        tp=1 pp=1 previous=""
        for arg in "$@"; do
            case $previous in
                --tp) tp=$arg ;;
                --pp) pp=$arg ;;
            esac
            case $arg in
                --tp=*) tp=${arg#--tp=} ;;
                --pp=*) pp=${arg#--pp=} ;;
            esac
            previous=$arg
        done
        # Anything but a positive number is left to the tool to refuse.
        [[ $tp =~ ^[1-9][0-9]*$ && $pp =~ ^[1-9][0-9]*$ ]] && workers=$((tp * pp))
    fi
    threads=$(($(grm_cpus_per_task) / workers))
    export OMP_NUM_THREADS=$((threads >= 1 ? threads : 1))
fi
grm_launch_tool convert "$(grm_python)" "$GRM_REPO/tools/convert_${direction}.py" "$@"
