#!/bin/bash
# Stand-in for a stage process, passed as GRM_PYTHON: on the first attempt it waits for SIGUSR1 and then
# exits 75 (as a stage does after checkpointing); a requeued attempt finishes at once. It touches
# $GRM_RUN_DIR/ready.<rank> once its handler is installed, so the test knows when to signal.
# Slurm (and srun forwarding) signal every process of the step, so `sleep` dies of SIGUSR1 too: no set -e.
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    echo "rank $RANK: requeued attempt ${SLURM_RESTART_COUNT}, finishing"
    exit 0
fi
trap 'echo "rank $RANK: got SIGUSR1"; exit 75' USR1
touch "$GRM_RUN_DIR/ready.$RANK"
for _ in $(seq 1 600); do
    sleep 0.1 || true
done
echo "rank $RANK: no SIGUSR1 within 60 s"
exit 1
