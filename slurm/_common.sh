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
#
# The job scripts of slurm/ use the second half (clbd_enter_root ... clbd_fit): see slurm/pretrain_cc3m.sh.

# shellcheck shell=bash
# Variables these functions set are read by the scripts that source this file.
# shellcheck disable=SC2034

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
    if ! [[ $MASTER_PORT =~ ^[0-9]+$ ]] || ((MASTER_PORT < 1 || MASTER_PORT > 65535)); then
        clbd_die "MASTER_PORT='$MASTER_PORT' is not a port number"
    fi
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
# Does not descend into a DeepSpeed checkpoint directory, nor into DIR/consolidated/ (fp32 copies of DeepSpeed
# checkpoints for evaluation: weights only, nothing a run could resume from) or DIR/universal/ (DeepSpeed's
# universal copies, which clbd makes itself when a checkpoint resumes on another number of ranks).
clbd_latest_checkpoint() {
    local dir=${1:-}
    clbd_require_path "$dir" "checkpoint directory"
    CLBD_LATEST_CKPT=$(find "$dir" \( -type d \( -name consolidated -o -name universal \) \) -prune -o \
        \( -name '*.ckpt' -prune -printf '%T@ %p\n' \) 2>/dev/null | sort -n -k1,1 | tail -n 1 | cut -d' ' -f2-)
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

# ---------------------------------------------------------------------------------------------------------------
# What clbd's job scripts (pretrain_*.sh, defend.sh, evaluate.sh) share. Each one sources this file, parses its
# own options with clbd_parse_options, sets CLBD_BASE_ARGS / CLBD_MANAGED_ARGS and calls clbd_fit or clbd_test.

# clbd_enter_root: CLBD_ROOT (default: the directory sbatch ran in) must be a clbd checkout; the job works there,
# so relative paths (configs, shards, runs) are relative to the repository.
clbd_enter_root() {
    CLBD_ROOT=${CLBD_ROOT:-${SLURM_SUBMIT_DIR:-}}
    [[ -n $CLBD_ROOT ]] || clbd_die "neither CLBD_ROOT nor SLURM_SUBMIT_DIR is set: submit with sbatch"
    [[ -f $CLBD_ROOT/clbd/__init__.py ]] ||
        clbd_die "CLBD_ROOT=$CLBD_ROOT is not a clbd checkout (no clbd/): run sbatch from the" \
            "repository root or export CLBD_ROOT=/path/to/clbd"
    cd "$CLBD_ROOT" || clbd_die "cannot enter CLBD_ROOT=$CLBD_ROOT"
    CLBD_ROOT=$PWD
    export CLBD_ROOT
}

# clbd_command: sets CLBD_CMD (an array) to the clbd command line: CLBD_PYTHON -c <clbd's main> when CLBD_PYTHON is
# set (a checkout used without installing it), else `clbd` from PATH. CLBD_PY is the matching interpreter.
clbd_command() {
    if [[ -n ${CLBD_PYTHON:-} ]]; then
        command -v "$CLBD_PYTHON" >/dev/null || clbd_die "CLBD_PYTHON=$CLBD_PYTHON is not an executable"
        CLBD_PY=$CLBD_PYTHON
        CLBD_CMD=("$CLBD_PYTHON" -c 'import sys; from clbd import main; sys.exit(main())')
        return 0
    fi
    local clbd
    clbd=$(command -v clbd) || clbd_die "no clbd command on PATH: activate the environment clbd is installed in" \
        "(pip install -e .) before sbatch, or export CLBD_PYTHON=/path/to/python"
    CLBD_CMD=("$clbd")
    CLBD_PY=$(sed -n '1s/^#! *//p' "$clbd" | cut -d' ' -f1) # the console script's interpreter
    command -v "$CLBD_PY" >/dev/null 2>&1 || CLBD_PY=python3
}

# clbd_parse_options "name:VAR ..." ARGS...: the script's own leading options (--name VALUE or --name=VALUE) set
# VAR; parsing stops at the first other argument or after "--". The rest go to clbd: CLBD_OVERRIDES (an array).
clbd_parse_options() {
    local specs=$1 spec name value matched
    shift
    CLBD_OVERRIDES=()
    while (($#)); do
        [[ $1 == -- ]] && { shift; break; }
        matched=0
        for spec in $specs; do
            name=${spec%%:*}
            if [[ $1 == "--$name" ]]; then
                (($# >= 2)) || clbd_die "option --$name needs a value"
                value=$2
                shift 2
            elif [[ $1 == "--$name="* ]]; then
                value=${1#*=}
                shift
            else
                continue
            fi
            printf -v "${spec#*:}" '%s' "$value"
            matched=1
            break
        done
        ((matched)) || break
    done
    CLBD_OVERRIDES=("$@")
}

# clbd_override_value KEY ARGS...: returns 0 and sets CLBD_OVERRIDE to the value the LAST of ARGS gives KEY
# (--KEY=V or --KEY V; "init_args." may appear in the argument, as jsonargparse allows), 1 when none does.
clbd_override_value() {
    local key=$1 arg name found=1
    shift
    CLBD_OVERRIDE=
    while (($#)); do
        arg=$1
        shift
        [[ $arg == --* ]] || continue
        name=${arg#--}
        name=${name%%=*}
        name=${name//init_args./}
        [[ $name == "$key" ]] || continue
        found=0
        if [[ $arg == *=* ]]; then
            CLBD_OVERRIDE=${arg#*=}
        elif (($#)); then
            CLBD_OVERRIDE=$1
            shift
        fi
    done
    return $found
}

# clbd_refuse_override KEY REASON ARGS...: the script sets KEY itself; an override of it is an error.
clbd_refuse_override() {
    local key=$1 reason=$2
    shift 2
    if clbd_override_value "$key" "$@"; then
        clbd_die "--$key is set by this script, not by an override ($reason)"
    fi
}

# clbd_abspath PATH: sets CLBD_ABSPATH (PATH made absolute against CLBD_ROOT, the job's working directory).
clbd_abspath() {
    case $1 in
    /* | *://* | builtin:*) CLBD_ABSPATH=$1 ;;
    *) CLBD_ABSPATH="$CLBD_ROOT/$1" ;;
    esac
}

# clbd_require_shards VAR HINT: the variable VAR names a shard set (index file, folder, brace pattern or glob of
# tars) that exists; it is made absolute (so config.yaml records where the data was). HINT says how to get it.
clbd_require_shards() {
    local var=$1 hint=$2 value
    value=${!var:-}
    [[ -n $value ]] || clbd_die "$var is not set: $hint"
    clbd_abspath "$value"
    value=$CLBD_ABSPATH
    if [[ $value == *[\{\*\?\[]* ]]; then
        # a pattern (e.g. DIR/{00000..00331}.tar): its folder must exist; clbd checks the shards themselves
        local folder=${value%%[\{\*\?\[]*}
        folder=${folder%/*}
        [[ -d ${folder:-/} ]] || clbd_die "$var=${!var}: folder $folder does not exist ($hint)"
    elif [[ $value != builtin:* && $value != *://* ]]; then
        [[ -e $value ]] || clbd_die "$var=${!var}: $value does not exist ($hint)"
    fi
    printf -v "$var" '%s' "$value"
}

# clbd_check_layout ARGS...: one task per device, the same number on every node; sets CLBD_NUM_NODES and
# CLBD_DEVICES (what --trainer.num_nodes / --trainer.devices must be). Overrides in ARGS that disagree with the
# allocation, and fewer GPUs than tasks on a node, end the job here, before anything starts.
clbd_check_layout() {
    clbd_require_vars SLURM_JOB_ID SLURM_NNODES SLURM_NTASKS
    case ${SLURM_JOB_NAME:-} in
    bash | interactive)
        clbd_die "job name '$SLURM_JOB_NAME': Lightning ignores SLURM for jobs named bash or interactive;" \
            "choose another --job-name"
        ;;
    esac
    local per_node=${SLURM_NTASKS_PER_NODE:-}
    [[ -n $per_node ]] || clbd_die "the job has $SLURM_NTASKS task(s) on $SLURM_NNODES node(s) but no" \
        "--ntasks-per-node: ask for one task per device with --nodes=N --ntasks-per-node=G (G = GPUs per node)"
    [[ $per_node =~ ^[0-9]+$ ]] || clbd_die "SLURM_NTASKS_PER_NODE='$per_node' is not a number"
    ((SLURM_NTASKS == SLURM_NNODES * per_node)) ||
        clbd_die "the allocation has $SLURM_NTASKS task(s), but --nodes=$SLURM_NNODES x --ntasks-per-node=$per_node" \
            "= $((SLURM_NNODES * per_node)); give --nodes and --ntasks-per-node only (no --ntasks)"
    CLBD_NUM_NODES=$SLURM_NNODES
    CLBD_DEVICES=$per_node
    if clbd_override_value trainer.num_nodes "$@" && [[ $CLBD_OVERRIDE != "$CLBD_NUM_NODES" ]]; then
        clbd_die "--trainer.num_nodes=$CLBD_OVERRIDE does not match the allocation: --nodes=$SLURM_NNODES." \
            "Change the #SBATCH --nodes line (or pass sbatch --nodes=N) and drop --trainer.num_nodes"
    fi
    if clbd_override_value trainer.devices "$@" && [[ $CLBD_OVERRIDE != "$CLBD_DEVICES" ]]; then
        clbd_die "--trainer.devices=$CLBD_OVERRIDE does not match the allocation: --ntasks-per-node=$per_node" \
            "(one task per device). Change the #SBATCH --ntasks-per-node and --gpus-per-node lines" \
            "(or the sbatch options) and drop --trainer.devices"
    fi
    # GPUs on this node: SLURM_GPUS_ON_NODE at run time, else what --gpus-per-node asked ("4" or "a100:4").
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    gpus=${gpus##*:}
    if [[ $gpus =~ ^[0-9]+$ ]] && ((gpus > 0)); then
        ((gpus >= per_node)) || clbd_die "$per_node task(s) per node but only $gpus GPU(s) per node: one task" \
            "per GPU needs --ntasks-per-node equal to --gpus-per-node"
        ((gpus == per_node)) || echo "clbd: WARNING: $gpus GPUs per node, $per_node task(s): $((gpus - per_node))" \
            "GPU(s) per node stay idle" >&2
    fi
}

# clbd_choose_run_dir BASE: CLBD_RUN_DIR as given at submission (resume a run by hand), else
# BASE/<job name>-<job id>, the same directory after every requeue.
clbd_choose_run_dir() {
    if [[ -n ${CLBD_RUN_DIR:-} ]]; then
        clbd_abspath "$CLBD_RUN_DIR"
        CLBD_RUN_DIR=$CLBD_ABSPATH
        mkdir -p "$CLBD_RUN_DIR" || clbd_die "cannot create run directory CLBD_RUN_DIR=$CLBD_RUN_DIR"
        export CLBD_RUN_DIR
    else
        clbd_abspath "$1"
        clbd_run_dir "$CLBD_ABSPATH"
    fi
}

# clbd_resume_args DIR: sets CLBD_RESUME_ARGS for `clbd fit` in run directory DIR. A finished run ends the job
# (nothing is started or written); a run with checkpoints resumes from the newest one (the hpc_ckpt_N.ckpt
# Lightning saves on SIGUSR1, or checkpoints/*.ckpt after a crash); a run that began but saved no checkpoint
# starts at step 0 again in the same directory (--ckpt_path last finds nothing: clbd says so and starts).
clbd_resume_args() {
    local dir=$1
    CLBD_RESUME_ARGS=()
    if [[ -e $dir/fit_finished.json ]]; then
        clbd_die "$dir already holds a finished run ($(tr -d '\n ' <"$dir/fit_finished.json")); nothing was" \
            "started and nothing was overwritten. Evaluate it with: sbatch slurm/evaluate.sh $dir;" \
            "a new run needs a new job (or another CLBD_RUN_DIR)"
    fi
    clbd_latest_checkpoint "$dir"
    if [[ -n $CLBD_LATEST_CKPT ]]; then
        CLBD_RESUME_ARGS=(--ckpt_path "$CLBD_LATEST_CKPT")
        echo "clbd: resuming from $CLBD_LATEST_CKPT (the newest checkpoint in $dir)"
        clbd_resume_layout "$CLBD_LATEST_CKPT"
    elif [[ -e $dir/config.yaml || -e $dir/checkpoints ]]; then
        CLBD_RESUME_ARGS=(--ckpt_path last)
        echo "clbd: $dir holds a run without checkpoints: starting it again at step 0"
    fi
}

# clbd_resume_layout CKPT: says when CKPT was written by another number of ranks than this job's tasks (a requeue
# that landed on another allocation, a resume by hand with other --nodes / --ntasks-per-node). clbd resumes it all
# the same: the rest of the interrupted epoch is dealt among the new ranks (each sample once), a DeepSpeed
# checkpoint goes through DeepSpeed's universal checkpoint. Needs clbd_command (CLBD_PY) first.
clbd_resume_layout() {
    local ckpt=$1 written_by
    written_by=$(CLBD_CKPT=$ckpt "$CLBD_PY" -c 'import os
from lightning_modules.checkpoints import checkpoint_ranks
print(checkpoint_ranks(os.environ["CLBD_CKPT"]) or "")' 2>/dev/null) || written_by=""
    if [[ -z $written_by ]]; then
        echo "clbd: $ckpt does not say how many ranks wrote it"
    elif ((written_by != SLURM_NTASKS)); then
        echo "clbd: $ckpt was written by $written_by rank(s); this job has $SLURM_NTASKS task(s)" \
            "(${SLURM_NNODES} node(s) x ${SLURM_NTASKS_PER_NODE:-?}): resuming on another number of ranks" \
            "(the rest of the interrupted epoch is dealt among the $SLURM_NTASKS ranks, each sample once)"
    else
        echo "clbd: $ckpt was written by $written_by rank(s), as many as this job has"
    fi
}

# clbd_strategy_args: CLBD_STRATEGY (e.g. deepspeed_stage_2) becomes --trainer.strategy, after the overrides.
clbd_strategy_args() {
    CLBD_STRATEGY_ARGS=()
    [[ -n ${CLBD_STRATEGY:-} ]] || return 0
    [[ $CLBD_STRATEGY =~ ^[A-Za-z0-9_.]+$ ]] || clbd_die "CLBD_STRATEGY='$CLBD_STRATEGY' is not a strategy name"
    if clbd_override_value trainer.strategy "$@" && [[ $CLBD_OVERRIDE != "$CLBD_STRATEGY" ]]; then
        clbd_die "CLBD_STRATEGY=$CLBD_STRATEGY and --trainer.strategy=$CLBD_OVERRIDE disagree: give one of them"
    fi
    CLBD_STRATEGY_ARGS=("--trainer.strategy=$CLBD_STRATEGY")
}

# clbd_consolidated CKPT: sets CLBD_CKPT_FILE to a single-file checkpoint for CKPT: CKPT itself when it is a file;
# for a DeepSpeed checkpoint (a folder), its fp32 copy RUN/consolidated/<name>, written once (clbd consolidate).
clbd_consolidated() {
    local ckpt=$1
    [[ -e $ckpt ]] || clbd_die "checkpoint not found: $ckpt"
    CLBD_CKPT_FILE=$("$CLBD_PY" -c 'import sys
from lightning_modules.checkpoints import consolidate
print(consolidate(sys.argv[1]))' "$ckpt") || clbd_die "could not consolidate $ckpt (is deepspeed installed? pip install -e '.[deepspeed]')"
}

# clbd_link_job_log DIR: DIR/slurm-<job id>.out points at this job's log (sbatch --output), so a run directory
# tells which job wrote it and where its log is.
clbd_link_job_log() {
    local out
    out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1)
    [[ -n $out && -e $out ]] && ln -sfn "$out" "$1/slurm-$SLURM_JOB_ID.out" 2>/dev/null
    return 0
}

# clbd_srun ARGS...: ARGS on every task (one per device); one failing task ends the others rather than leaving
# them waiting in a collective.
clbd_srun() {
    printf 'clbd: srun'
    printf ' %q' "$@"
    printf '\n'
    srun --kill-on-bad-exit=1 "$@"
}

# clbd_fit RUNS_BASE OVERRIDES...: the whole training job. Runs
#   clbd fit "${CLBD_BASE_ARGS[@]}" OVERRIDES... "${CLBD_MANAGED_ARGS[@]}" <layout, run dir, strategy, resume>
# on one task per device, in the run directory clbd_choose_run_dir picks; the script's own arguments come after
# the user's so that a config file among the overrides cannot change them.
clbd_fit() {
    local runs=$1
    shift
    clbd_check_layout "$@"
    clbd_refuse_override trainer.default_root_dir "the run directory is $runs/<job name>-<job id>; set CLBD_RUNS" \
        "for another parent folder, or CLBD_RUN_DIR to resume a given run" "$@"
    clbd_refuse_override ckpt_path "the newest checkpoint of the run directory is resumed; to resume another" \
        "run, submit with CLBD_RUN_DIR=<its run directory>" "$@"
    clbd_strategy_args "$@"
    clbd_command
    clbd_choose_run_dir "$runs"
    clbd_resume_args "$CLBD_RUN_DIR"
    clbd_dist_env
    clbd_link_job_log "$CLBD_RUN_DIR"
    clbd_job_banner
    clbd_srun "${CLBD_CMD[@]}" fit "${CLBD_BASE_ARGS[@]}" "$@" "${CLBD_MANAGED_ARGS[@]}" "${CLBD_STRATEGY_ARGS[@]}" \
        "--trainer.num_nodes=$CLBD_NUM_NODES" "--trainer.devices=$CLBD_DEVICES" \
        "--trainer.default_root_dir=$CLBD_RUN_DIR" "${CLBD_RESUME_ARGS[@]}" ||
        return
    # (A DeepSpeed fit writes the fp32 copy RUN/consolidated/last.ckpt itself when it ends.)
    echo "clbd: fit ended; run directory $CLBD_RUN_DIR"
}
