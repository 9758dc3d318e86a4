#!/bin/bash
# Stand-in for a stage process, passed as GRM_PYTHON: on the first attempt, on SIGUSR1 rank 0 marks the run
# folder as a stage does once every rank has checkpointed (megatron_grm/train/signals.py exit_for_requeue)
# and exits 75, while rank 1 hangs as a rank stuck in teardown would, until srun kills it after --wait. A
# requeued attempt finishes at once. Each rank touches $GRM_RUN_DIR/ready.<rank> once its handler is set.
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    echo "rank $RANK: requeued attempt ${SLURM_RESTART_COUNT}, finishing"
    exit 0
fi
if ((RANK == 0)); then
    trap 'echo "rank 0: got SIGUSR1, checkpointed"; echo "checkpoint of step 3" > "$GRM_RUN_DIR/stopped_on_signal"; exit 75' USR1
else
    trap 'echo "rank $RANK: got SIGUSR1, hanging in teardown"' USR1
fi
touch "$GRM_RUN_DIR/ready.$RANK"
for _ in $(seq 1 600); do
    sleep 0.1 || true
done
echo "rank $RANK: still here after 60 s"
exit 1
