#!/bin/bash
# Stand-in for a stage process, passed as GRM_PYTHON (so it gets `-m MODULE OVERRIDES...` and ignores
# them): every attempt "checkpoints and exits" with 75, so the job keeps asking to be requeued.
echo "rank ${RANK:-?}: attempt ${SLURM_RESTART_COUNT:-0}, exiting 75"
exit 75
