# Helpers shared by clbd's sbatch scripts. Source it from a batch script:
#
#   source "${CLBD_ROOT:-$SLURM_SUBMIT_DIR}/slurm/_common.sh"
#   clbd_require_vars CLBD_CONFIG
#   clbd_require_path "$CLBD_CONFIG" "config file"
#   clbd_dist_env                       # exports MASTER_ADDR, MASTER_PORT
#   clbd_run_dir "${CLBD_RUNS:-runs}"   # sets and exports CLBD_RUN_DIR (same directory after a requeue)
#   clbd_latest_checkpoint "$CLBD_RUN_DIR"   # sets CLBD_LATEST_CKPT ("" when there is none)
#   clbd_job_banner
#   srun python -m ... --trainer.default_root_dir "$CLBD_RUN_DIR"
#
# Functions set variables rather than print values: a failure inside "$(...)" would only end the subshell,
# while clbd_die here ends the batch script itself, with the reason in the job log.
# Nothing here enables "set -e" or changes the caller's shell options.

# Prints "clbd: ERROR: ..." to the job log (stderr) and ends the batch script with status 1.
clbd_die() {
    echo "clbd: ERROR: $*" >&2
    exit 1
}

# clbd_require_vars NAME...: each variable must be set and non-empty.
clbd_require_vars() {
    local name
    for name in "$@"; do
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || clbd_die "clbd_require_vars: '$name' is not a variable name"
        [[ -z ${!name:-} ]] || continue
        if [[ $name == SLURM_* ]]; then
            clbd_die "required variable $name is not set: run this inside a SLURM job (sbatch)"
        fi
        clbd_die "required variable $name is not set: export it before sbatch, or pass sbatch --export=ALL,$name=..."
    done
}

# clbd_require_path PATH [WHAT]: PATH must exist (file or directory).
clbd_require_path() {
    local path=${1:-} what=${2:-path}
    [[ -n $path ]] || clbd_die "$what: empty path"
    [[ -e $path ]] || clbd_die "$what not found: $path (working directory: $PWD)"
}

# Exports MASTER_ADDR (first host of the allocation) and MASTER_PORT. The port follows Lightning's
# SLURMEnvironment (15000 + the last 4 digits of the job id), so processes agree on it whether or not they see
# these variables; values already exported by the user win.
clbd_dist_env() {
    clbd_require_vars SLURM_JOB_ID SLURM_JOB_NODELIST
    if [[ -z ${MASTER_ADDR:-} ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        [[ -n $MASTER_ADDR ]] || clbd_die "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' with scontrol show hostnames"
    fi
    if [[ -z ${MASTER_PORT:-} ]]; then
        local digits=${SLURM_JOB_ID:${#SLURM_JOB_ID}<4?0:-4} # ${x: -4} is empty for ids shorter than 4 digits
        [[ $digits =~ ^[0-9]+$ ]] || clbd_die "SLURM_JOB_ID='$SLURM_JOB_ID' is not a number"
        MASTER_PORT=$((15000 + 10#$digits))
    fi
    [[ $MASTER_PORT =~ ^[0-9]+$ ]] && ((MASTER_PORT > 0 && MASTER_PORT < 65536)) ||
        clbd_die "MASTER_PORT='$MASTER_PORT' is not a port number"
    export MASTER_ADDR MASTER_PORT
}

# clbd_run_dir BASE: sets and exports CLBD_RUN_DIR=BASE/<job name>-<job id> and creates it.
# The job id does not change when a job is requeued, so a restarted job finds its own checkpoints there.
# Array tasks get <job name>-<array job id>_<task id>.
clbd_run_dir() {
    local base=${1:-}
    [[ -n $base ]] || clbd_die "clbd_run_dir: no base directory given"
    clbd_require_vars SLURM_JOB_ID
    local name=${SLURM_JOB_NAME:-job} id=$SLURM_JOB_ID
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        id="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    fi
    name=${name//[^A-Za-z0-9._-]/_} # job names may hold '/', spaces (the script path)
    CLBD_RUN_DIR="${base%/}/${name}-${id}"
    mkdir -p "$CLBD_RUN_DIR" || clbd_die "cannot create run directory $CLBD_RUN_DIR"
    export CLBD_RUN_DIR
}

# clbd_latest_checkpoint DIR: sets CLBD_LATEST_CKPT to the most recently modified "*.ckpt" under DIR
# (files: Lightning, hpc_ckpt_N.ckpt, last.ckpt; directories: DeepSpeed), or "" when there is none.
# Does not descend into a DeepSpeed checkpoint directory.
clbd_latest_checkpoint() {
    local dir=${1:-}
    clbd_require_path "$dir" "checkpoint directory"
    CLBD_LATEST_CKPT=$(find "$dir" -name '*.ckpt' -prune -printf '%T@ %p\n' 2>/dev/null |
        sort -n -k1,1 | tail -n 1 | cut -d' ' -f2-)
    export CLBD_LATEST_CKPT
}

# clbd_wait PID: waits for a background command (e.g. "srun ... &") and returns its exit status. A plain "wait"
# returns early (status > 128) whenever a signal trapped by the batch shell arrives (--signal=B:USR1@90).
clbd_wait() {
    local pid=${1:?clbd_wait: no pid given} status
    wait "$pid"
    status=$?
    # > 128: interrupted by a trapped signal, or the command died of a signal (then it is gone).
    while ((status > 128)) && kill -0 "$pid" 2>/dev/null; do
        wait "$pid"
        status=$?
    done
    return "$status"
}

# One block at the top of the job log: what ran where, and which restart this is.
clbd_job_banner() {
    echo "clbd: job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}" \
        "on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NNODES:-?} node(s), ${SLURM_NTASKS:-?} task(s)," \
        "master ${MASTER_ADDR:-unset}:${MASTER_PORT:-unset}, run dir ${CLBD_RUN_DIR:-unset}," \
        "checkpoint ${CLBD_LATEST_CKPT:-none}, started $(date -Is)"
}
