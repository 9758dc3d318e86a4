#!/bin/bash
# A batch script (not a stage) whose shell is still alive when Slurm kills the job for its requeue: it
# requeues itself with slurm/common.sh's grm_requeue and then lingers in an EXIT trap, as a shell on a busy
# node may. The requeue helper must already be out of the job's process tree by then, or the kill takes it
# too and the restart waits Slurm's 120 s. The requeued attempt logs "restarted" and ends.
set -euo pipefail
# shellcheck source=slurm/common.sh
source "$GRM_REPO/slurm/common.sh"
grm_prepare requeue-slow-exit
if ((GRM_RESTART > 0)); then
    grm_log "restarted"
    exit 0
fi
trap 'sleep 5' EXIT
grm_requeue
