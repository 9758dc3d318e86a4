#!/bin/bash
# Rule-based online RL with GRPO (SPCT, paper Sec. 3.2): G judgments, +-1 rewards, group advantages, PG + KL.
# Defaults: 16 nodes x 8 A100, one task per GPU; Hydra overrides pass through, e.g.
#   sbatch slurm/grpo.sh model=gemma2_27b parallel=tp8_pp2_sp precision=bf16 trainer.max_steps=900
# Checkpoints on the USR1 warning (10 min before the limit) and requeues itself; see docs/slurm.md.
#SBATCH --job-name=grm-grpo
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
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

grm_launch_stage grpo megatron_grm.stages.grpo "$@"
