# shellcheck shell=bash
# Shared by every slurm/<stage>.sh: run folder, rendezvous, NCCL/gloo settings, the optional pyxis/enroot
# container, the srun launch (one task per GPU) and preemption-safe requeue. Sourced, never executed.
#
# Environment knobs (all optional; docs/slurm.md has the full story):
#   GRM_RUN_DIR          run folder (= trainer.run_dir): checkpoints, TensorBoard, logs. Default
#                        $GRM_RUNS_ROOT/<stage>-<jobid>; a requeued job keeps its id, hence its folder, and resumes
#   GRM_RUNS_ROOT        parent of the default run folders (default: <submit dir>/runs)
#   GRM_CLUSTER          Hydra cluster config added unless the overrides choose one (default a100_16node; empty: none)
#   GRM_MAX_RESTARTS     restarts (SLURM_RESTART_COUNT, Slurm's own requeues included) after which a checkpointed stop is not requeued (default 10)
#   GRM_REQUEUE_START_DELAY  seconds from a self-requeue to the restart (default 5; Slurm's own: 120)
#   GRM_PYTHON           interpreter (default: <repo>/.venv/bin/python if present, else python3; python in a container)
#   GRM_CONTAINER_IMAGE  run the tasks in this image with pyxis/enroot (a .sqsh file or a registry image)
#   GRM_CONTAINER_MOUNTS extra comma-separated src:dst container mounts (data, models, caches)
#   GRM_SRUN_WAIT        seconds the other ranks may live on after the first rank exits (default 300)
#   GRM_MASTER_ADDR      rendezvous host (default: the allocation's first node, as `scontrol show hostnames` names it)
#   GRM_MASTER_PORT      rendezvous port (default: derived from the job id)
#   GRM_SOCKET_IFNAME    network interface for NCCL and gloo bootstrap traffic (default: their own choice)
#   GRM_DRY_RUN=1        log the srun command instead of running it

GRM_EXIT_PREEMPTED=75  # megatron_grm/train/signals.py EXIT_CODE_PREEMPTED: checkpoint saved, requeue me
GRM_STOPPED_MARKER=stopped_on_signal  # signals.py STOPPED_MARKER: every rank saved on a signal (in $GRM_RUN_DIR)

grm_log() {
    local line
    line="[grm $(date '+%F %T') job ${SLURM_JOB_ID:-?}.${SLURM_RESTART_COUNT:-0}] $*"
    echo "$line"
    if [[ -n "${GRM_LAUNCH_LOG:-}" ]]; then
        echo "$line" >>"$GRM_LAUNCH_LOG"
    fi
}

grm_die() {
    grm_log "error: $*" >&2
    exit 2
}

# grm_hydra_overrides OVERRIDES... — the user's Hydra overrides, plus `cluster=$GRM_CLUSTER` unless they
# choose the cluster themselves (`cluster=...`, or an experiment preset, which names its own cluster and
# which a command-line `cluster=` would silently beat), plus `trainer.run_dir=` unless given (then it
# names the run folder). Sets GRM_OVERRIDES, GRM_RUN_DIR, GRM_USER_RUN_DIR.
grm_hydra_overrides() {
    GRM_OVERRIDES=("$@")
    local arg user_run_dir="" cluster_chosen=0
    for arg in "$@"; do
        case $arg in
            trainer.run_dir=* | +trainer.run_dir=* | ++trainer.run_dir=*) user_run_dir=${arg#*trainer.run_dir=} ;;
            cluster=* | +cluster=* | ++cluster=* | experiment=* | +experiment=* | ++experiment=*) cluster_chosen=1 ;;
        esac
    done
    if [[ -n "$user_run_dir" ]]; then
        GRM_RUN_DIR=$user_run_dir
    fi
    if [[ $cluster_chosen = 0 && -n "${GRM_CLUSTER-a100_16node}" ]]; then
        # ${a[@]+"${a[@]}"}: an empty array is "unbound" to `set -u` in bash < 4.4.
        GRM_OVERRIDES=("cluster=${GRM_CLUSTER-a100_16node}" ${GRM_OVERRIDES[@]+"${GRM_OVERRIDES[@]}"})
    fi
    GRM_USER_RUN_DIR=$user_run_dir
}

# grm_hydra_literal VALUE — VALUE as a Hydra override value read literally: single-quoted, with ' and ${
# escaped, so a run folder such as runs/lr=1e-6,bs(8) is not parsed as override syntax or interpolation.
grm_hydra_literal() {
    local value=$1
    value=${value//\'/\\\'}
    value=${value//\$\{/\\\$\{}
    printf "'%s'" "$value"
}

# grm_prepare STAGE — check the allocation, create the run folder, set rendezvous and communication
# variables. Sets GRM_STAGE, GRM_RESTART, GRM_RUN_DIR (absolute), GRM_LOG_DIR, GRM_LAUNCH_LOG,
# GRM_CPUS_PER_TASK and GRM_TASK_VARS.
grm_prepare() {
    GRM_STAGE=$1
    [[ -n "${SLURM_JOB_ID:-}" ]] || grm_die "not inside a Slurm job: submit with 'sbatch slurm/${GRM_STAGE}.sh ...'"
    GRM_RESTART=${SLURM_RESTART_COUNT:-0}
    GRM_MAX_RESTARTS=${GRM_MAX_RESTARTS:-10}
    GRM_SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
    GRM_RUN_DIR=${GRM_RUN_DIR:-${GRM_RUNS_ROOT:-$GRM_SUBMIT_DIR/runs}/${GRM_STAGE}-${SLURM_JOB_ID}}
    [[ "$GRM_RUN_DIR" = /* ]] || GRM_RUN_DIR=$GRM_SUBMIT_DIR/$GRM_RUN_DIR
    GRM_LOG_DIR=$GRM_RUN_DIR/logs
    mkdir -p "$GRM_LOG_DIR" || grm_die "cannot create $GRM_LOG_DIR"
    GRM_LAUNCH_LOG=$GRM_LOG_DIR/launcher-${SLURM_JOB_ID}.log
    GRM_STEP_LOG=$GRM_LOG_DIR/${GRM_STAGE}-${SLURM_JOB_ID}.${GRM_RESTART}.log
    export GRM_RUN_DIR
    GRM_CPUS_PER_TASK=$(grm_cpus_per_task)

    grm_rendezvous
    grm_comm_env
    grm_log "stage=$GRM_STAGE nodes=${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-?}) tasks=${SLURM_NTASKS:-1}" \
        "cpus/task=$GRM_CPUS_PER_TASK" \
        "restart=$GRM_RESTART/$GRM_MAX_RESTARTS run_dir=$GRM_RUN_DIR master=$MASTER_ADDR:$MASTER_PORT" \
        "image=${GRM_CONTAINER_IMAGE:-none} log=$GRM_STEP_LOG"
}

# The first node of the allocation hosts the TCP store, under the name Slurm gives it unless
# GRM_MASTER_ADDR names it otherwise (sites whose node names resolve to a management network that the
# other nodes cannot reach). The port is a function of the job id, so jobs sharing a node do not collide,
# and it is unchanged after a requeue (the old ranks are gone by then).
grm_rendezvous() {
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}")
    export MASTER_ADDR=${GRM_MASTER_ADDR:-${hosts[0]:-localhost}}
    # 20000-29999: below Linux's ephemeral range (32768+), where an outgoing connection may hold the port.
    export MASTER_PORT=${GRM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
}

# grm_cpus_per_task — CPUs for each task of a step: SLURM_CPUS_PER_TASK when the job was submitted with
# --cpus-per-task, else the allocated CPUs of a node (the fewest of any node of the job; whole nodes under
# --exclusive) divided by the tasks per node. The scripts ask for whole nodes rather than a CPU count
# per task, so that they fit 8-GPU nodes of 96 CPUs as well as of 128 or more.
grm_cpus_per_task() {
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        echo "$SLURM_CPUS_PER_TASK"
        return
    fi
    local cpus="" count tasks
    # SLURM_JOB_CPUS_PER_NODE looks like "96(x16)" or "128(x2),96".
    for count in ${SLURM_JOB_CPUS_PER_NODE//,/ }; do
        count=${count%%(*}
        [[ $count =~ ^[0-9]+$ ]] || continue
        if [[ -z "$cpus" ]] || ((count < cpus)); then
            cpus=$count
        fi
    done
    cpus=${cpus:-${SLURM_CPUS_ON_NODE:-1}}
    tasks=${SLURM_NTASKS_PER_NODE:-$(((${SLURM_NTASKS:-1} + ${SLURM_JOB_NUM_NODES:-1} - 1) / ${SLURM_JOB_NUM_NODES:-1}))}
    ((tasks >= 1)) || tasks=1
    count=$((cpus / tasks))
    echo $((count >= 1 ? count : 1))
}

# Communication and threading defaults; whatever the user exported before sbatch wins. GRM_TASK_VARS
# names them: every task gets them on its command line (grm_task_env), because inside a container the
# image's own ENV values would otherwise beat the exported ones (pyxis keeps the image's value).
grm_comm_env() {
    export PYTHONUNBUFFERED=1
    export HYDRA_FULL_ERROR=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$GRM_CPUS_PER_TASK}
    # Megatron-Core: TP/SP communication kernels must be queued in program order (one hardware queue).
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # A rank that dies or hangs in a collective must end the job, not idle 128 GPUs until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # InfiniBand (8 HCAs per DGX A100): a longer retry timeout rides out transient fabric hiccups.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    GRM_TASK_VARS=(PYTHONUNBUFFERED HYDRA_FULL_ERROR OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS
        TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS NCCL_DEBUG NCCL_IB_TIMEOUT
        MASTER_ADDR MASTER_PORT GRM_RUN_DIR)
    if [[ -n "${GRM_SOCKET_IFNAME:-}" ]]; then
        export NCCL_SOCKET_IFNAME=$GRM_SOCKET_IFNAME GLOO_SOCKET_IFNAME=$GRM_SOCKET_IFNAME
        GRM_TASK_VARS+=(NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME)
    fi
}

# grm_task_env SCRIPT — the words that start a task's command: `env` with GRM_REPO and every GRM_TASK_VARS
# value, then `bash -c SCRIPT grm-task` (SCRIPT puts the checkout first on PYTHONPATH and ends in
# `exec "$@"`). It runs where the task runs, inside the container too, so these values hold there.
# Into the array GRM_TASK_CMD.
grm_task_env() {
    local name
    GRM_TASK_CMD=(env "GRM_REPO=$GRM_REPO")
    for name in "${GRM_TASK_VARS[@]}"; do
        GRM_TASK_CMD+=("$name=${!name}")
    done
    GRM_TASK_CMD+=(bash -c "$1" grm-task)
}

grm_python() {
    if [[ -n "${GRM_PYTHON:-}" ]]; then
        echo "$GRM_PYTHON"
    elif [[ -n "${GRM_CONTAINER_IMAGE:-}" ]]; then
        echo python
    elif [[ -x "$GRM_REPO/.venv/bin/python" ]]; then
        echo "$GRM_REPO/.venv/bin/python"
    else
        echo python3
    fi
}

# grm_srun_args [SRUN OPTIONS...] — the srun command shared by every step, into the array GRM_SRUN.
# --kill-on-bad-exit is off because ranks that exit 75 one after another must not kill each other
# mid-shutdown (that would turn exit 75 into a signal death); --wait bounds how long the other ranks may
# outlive one that crashed. All ranks' output goes, rank-labelled, into the run folder.
grm_srun_args() {
    GRM_SRUN=(srun
        --cpus-per-task="$GRM_CPUS_PER_TASK"
        --kill-on-bad-exit=0
        --wait="${GRM_SRUN_WAIT:-300}"
        --label
        --output="$GRM_STEP_LOG"
        "$@"
    )
    if [[ -n "${GRM_CONTAINER_IMAGE:-}" ]]; then
        GRM_SRUN+=(
            --container-image="$GRM_CONTAINER_IMAGE"
            --container-mounts="$(grm_container_mounts)"
            --container-workdir="$GRM_SUBMIT_DIR"
            --no-container-mount-home
        )
    fi
}

# The checkout, the submit folder and the run folder at their own paths (so every path in the overrides
# and logs means the same inside and outside), then GRM_CONTAINER_MOUNTS; nested duplicates dropped.
grm_container_mounts() {
    local mounts="" path kept
    local -a paths=()
    for path in "$GRM_REPO" "$GRM_SUBMIT_DIR" "$GRM_RUN_DIR"; do
        for kept in ${paths[@]+"${paths[@]}"}; do
            [[ "$path" = "$kept" || "$path" = "$kept"/* ]] && continue 2
        done
        paths+=("$path")
        mounts+="${mounts:+,}$path:$path"
    done
    if [[ -n "${GRM_CONTAINER_MOUNTS:-}" ]]; then
        mounts+=",$GRM_CONTAINER_MOUNTS"
    fi
    echo "$mounts"
}

# What every task (and tool) runs first, inside the container when there is one: the checkout whose
# script was submitted goes first on the PYTHONPATH the task sees (the image's, inside a container),
# and PYTHONSAFEPATH (Python >= 3.11) keeps `python -m` from putting the working directory (the submit folder) ahead of it,
# where a stray megatron_grm/ folder would shadow the checkout. Expanded inside each task.
# shellcheck disable=SC2016
GRM_TOOL_ENV='export PYTHONPATH=$GRM_REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1; exec "$@"'
# A stage's tasks also get the variables torchrun would give them, taken from Slurm's.
# shellcheck disable=SC2016
GRM_TASK_ENV='export PYTHONPATH=$GRM_REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1 RANK=$SLURM_PROCID \
    LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}; exec "$@"'

# grm_run_step COMMAND... — run one srun step in the background, so that this shell can take signals
# while it waits: USR1 sent to the batch shell (sbatch --signal=B:USR1@T, scancel --batch) is forwarded
# to srun, which passes it to every rank. A TERM to the batch shell is recorded (no requeue then) and
# forwarded as USR1: srun answers a SIGTERM by SIGKILLing every task ("forcing job termination"), which
# would leave the ranks no time to checkpoint. Sets GRM_STEP_RC.
grm_run_step() {
    GRM_BATCH_TERMINATED=0
    GRM_STEP_RC=0
    if [[ "${GRM_DRY_RUN:-0}" = 1 ]]; then
        grm_log "dry run: $(printf '%q ' "$@")"
        return 0
    fi
    "$@" &
    GRM_STEP_PID=$!
    trap 'grm_forward USR1 USR1' USR1
    trap 'GRM_BATCH_TERMINATED=1; grm_forward TERM USR1' TERM
    while :; do
        GRM_STEP_RC=0
        wait "$GRM_STEP_PID" || GRM_STEP_RC=$?
        # wait returns >128 when a trapped signal interrupts it; the step is then still running.
        if ((GRM_STEP_RC > 128)) && kill -0 "$GRM_STEP_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 TERM
}

# grm_forward GOT SEND — the batch shell got SIG<GOT>: send SIG<SEND> to srun, which passes it to the ranks.
grm_forward() {
    if [[ $1 = "$2" ]]; then
        grm_log "batch shell got SIG$1: forwarding it to the ranks (srun pid $GRM_STEP_PID)"
    else
        grm_log "batch shell got SIG$1: forwarding SIG$2 to the ranks (srun pid $GRM_STEP_PID), so that they checkpoint"
    fi
    kill -s "$2" "$GRM_STEP_PID" 2>/dev/null || true
}

# grm_finish — what the step's exit code means for the job. 75: every rank saved a checkpoint on a
# signal, so requeue (bounded by GRM_MAX_RESTARTS); the next start resumes from checkpoints/latest.
# Anything else ends the job with that code: a real error is never retried.
grm_finish() {
    local rc=$GRM_STEP_RC
    if ((rc == 0)); then
        grm_log "step finished (exit 0); run folder $GRM_RUN_DIR"
        exit 0
    fi
    if ((rc != GRM_EXIT_PREEMPTED)) && [[ -f "$GRM_RUN_DIR/$GRM_STOPPED_MARKER" ]]; then
        # Every rank had checkpointed on the signal (rank 0 writes the marker after that), but the step
        # still ended otherwise: a rank hung in teardown and srun killed it after --wait (137), say.
        grm_log "step exited $rc after checkpointing on a signal ($GRM_RUN_DIR/$GRM_STOPPED_MARKER:" \
            "$(head -c 200 "$GRM_RUN_DIR/$GRM_STOPPED_MARKER")): treating it as $GRM_EXIT_PREEMPTED"
        rc=$GRM_EXIT_PREEMPTED
    fi
    if ((rc != GRM_EXIT_PREEMPTED)); then
        grm_log "step failed (exit $rc): not requeuing. Last lines of $GRM_STEP_LOG:"
        tail -n 40 "$GRM_STEP_LOG" 2>/dev/null || true
        exit "$rc"
    fi
    if [[ "${GRM_BATCH_TERMINATED:-0}" = 1 ]]; then
        # Slurm itself is ending the job (scancel, time limit, preemption): a preempted job is requeued
        # by Slurm on its own, and a cancelled one must stay cancelled.
        grm_log "step checkpointed and exited 75 while Slurm was terminating the job: not requeuing"
        exit "$rc"
    fi
    if ((GRM_RESTART >= GRM_MAX_RESTARTS)); then
        grm_log "step checkpointed and exited 75, but the job has been requeued $GRM_RESTART times" \
            "(GRM_MAX_RESTARTS=$GRM_MAX_RESTARTS): not requeuing; resubmit with GRM_RUN_DIR=$GRM_RUN_DIR"
        exit "$rc"
    fi
    grm_requeue
}

# `scontrol requeue` gives the job back to the queue under the same id (hence the same run folder), but
# only once it has finished completing, and then with a begin time 120 s ahead (the credential
# lifetime). This shell cannot fix that itself: it is killed while the job completes, and a StartTime
# set before the requeue is overwritten. So a small detached helper waits until the job is PENDING
# again, then GRM_REQUEUE_START_DELAY seconds more (default 5), and sets StartTime=now, which also makes
# the scheduler look at the job at once. The pause matters: measured here, slurmd refuses a relaunch
# whose credential dates from the same second as the revocation of the previous one ("Job credential
# revoked": the job FAILS). The helper is forked twice, so it is no longer this shell's child when the
# requeue's kill walks the job's process tree (proctrack/linuxproc), however long this shell takes to
# exit; a busy slurmctld only makes it ask again. Where proctrack/cgroup kills every process of the
# job, the helper dies with it and the job simply starts 120 s later.
grm_requeue() {
    local job=$SLURM_JOB_ID next=$((GRM_RESTART + 1))
    grm_log "step checkpointed and exited 75: requeuing (restart $next of at most $GRM_MAX_RESTARTS)"
    # shellcheck disable=SC2016  # $1..$3 are the helper's own arguments
    (setsid nohup bash -c '
        for _ in $(seq 1 300); do
            if ! info=$(scontrol show job -o "$1" 2>&1); then
                case $info in *"Invalid job id"*) exit 0 ;; esac
                sleep 1
                continue
            fi
            case $info in
                *JobState=PENDING*Restarts="$2"\ *)
                    sleep "$3"
                    scontrol update JobId="$1" StartTime=now &&
                        echo "requeue helper: StartTime=now for job $1 at $(date +%T)"
                    exit 0 ;;
                *JobState=RUNNING*Restarts="$2"\ * | *JobState=CANCELLED* | *JobState=COMPLETED*) exit 0 ;;
            esac
            sleep 1
        done
        echo "requeue helper: job $1 was not PENDING for restart $2 within 300 polls; Slurm starts it itself"
        ' grm-requeue-helper "$job" "$next" "${GRM_REQUEUE_START_DELAY:-5}" >>"$GRM_LAUNCH_LOG" 2>&1 </dev/null &)
    local attempt
    for attempt in 1 2 3; do  # a busy controller may time out: the checkpoint is there, so ask again
        scontrol requeue "$job" && exit 0
        ((attempt < 3)) && sleep 10
    done
    grm_log "scontrol requeue $job failed 3 times (submitted with --no-requeue?): resubmit with GRM_RUN_DIR=$GRM_RUN_DIR"
    exit "$GRM_EXIT_PREEMPTED"
}

# grm_launch_stage STAGE MODULE OVERRIDES... — a Hydra stage: one Python process per task (per GPU),
# `python -m MODULE OVERRIDES...`, ranks from Slurm, requeue on exit 75.
grm_launch_stage() {
    local stage=$1 module=$2 python
    shift 2
    grm_hydra_overrides "$@"
    grm_prepare "$stage"
    [[ -n "$GRM_USER_RUN_DIR" ]] || GRM_OVERRIDES+=("trainer.run_dir=$(grm_hydra_literal "$GRM_RUN_DIR")")
    grm_srun_args
    grm_task_env "$GRM_TASK_ENV"
    rm -f "$GRM_RUN_DIR/$GRM_STOPPED_MARKER"  # an earlier attempt's; the stage writes it anew when it stops
    python=$(grm_python)
    grm_run_step "${GRM_SRUN[@]}" "${GRM_TASK_CMD[@]}" "$python" -m "$module" \
        ${GRM_OVERRIDES[@]+"${GRM_OVERRIDES[@]}"}
    grm_finish
}

# grm_launch_tool NAME COMMAND... — a single-task job (the conversion tools start their own local
# worker processes); same run folder, logs and exit handling as a stage.
grm_launch_tool() {
    local name=$1
    shift
    grm_prepare "$name"
    grm_srun_args --nodes=1 --ntasks=1
    grm_task_env "$GRM_TOOL_ENV"
    grm_run_step "${GRM_SRUN[@]}" "${GRM_TASK_CMD[@]}" "$@"
    grm_finish
}
