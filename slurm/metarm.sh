#!/bin/bash
# Meta reward model (paper Sec. 3.3): a scalar head that predicts whether a judgment is correct.
# Defaults: 16 nodes x 8 A100, one task per GPU; Hydra overrides pass through, e.g.
#   sbatch slurm/metarm.sh model=gemma2_27b parallel=tp8_pp2_sp precision=bf16
# Checkpoints on the USR1 warning (10 min before the limit) and requeues itself; see docs/slurm.md.
#SBATCH --job-name=grm-metarm
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

grm_launch_stage metarm megatron_grm.stages.metarm "$@"
