#!/bin/bash
# Evaluation of a run's checkpoint: clbd test --config RUN_DIR/config.yaml --ckpt_path CKPT.
#
#   sbatch slurm/evaluate.sh RUN_DIR [CKPT] [CLBD OVERRIDES...]
#   sbatch slurm/evaluate.sh runs/clip-cc3m-1234 --data.init_args.test_shards=data/imagenet-val
#
# CKPT (default RUN_DIR/checkpoints/last.ckpt): a checkpoint file, or a DeepSpeed checkpoint folder (evaluated
# through its fp32 copy RUN_DIR/consolidated/<name>, written once). Results: metrics.json beside the checkpoint
# (one entry per checkpoint name) and RUN_DIR/test/metrics.csv; training files are not touched. The strategy is
# Lightning's default for the devices (CLBD_STRATEGY to choose another). No --signal: on preemption the job is
# requeued and the evaluation runs again from the start (a SIGUSR1 would make Lightning save an hpc checkpoint
# into the run directory, which a resumed training run would then take for its newest).
#SBATCH --job-name=evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=4:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
CLBD_ROOT=${CLBD_ROOT:-${SLURM_SUBMIT_DIR:?submit this script with sbatch}}
[[ -f $CLBD_ROOT/slurm/_common.sh ]] || {
    echo "clbd: ERROR: $CLBD_ROOT/slurm/_common.sh not found: run sbatch from the clbd checkout or set CLBD_ROOT" >&2
    exit 1
}
# shellcheck source=slurm/_common.sh
source "$CLBD_ROOT/slurm/_common.sh"
clbd_enter_root

(($# >= 1)) || clbd_die "usage: sbatch slurm/evaluate.sh RUN_DIR [CKPT] [clbd overrides...]"
clbd_abspath "$1"
RUN_DIR=$CLBD_ABSPATH
shift
clbd_require_path "$RUN_DIR/config.yaml" "run configuration (is RUN_DIR a clbd run directory?)"
CKPT=$RUN_DIR/checkpoints/last.ckpt
if (($#)) && [[ $1 != -* ]]; then
    clbd_abspath "$1"
    CKPT=$CLBD_ABSPATH
    shift
fi
clbd_require_path "$CKPT" "checkpoint"
clbd_check_layout "$@"
clbd_refuse_override ckpt_path "the checkpoint is the script's second argument" "$@"
clbd_refuse_override trainer.default_root_dir "results go to RUN_DIR and beside the checkpoint" "$@"
if clbd_override_value trainer.strategy "$@"; then
    clbd_die "--trainer.strategy: set CLBD_STRATEGY instead"
fi
clbd_command
clbd_consolidated "$CKPT"
clbd_dist_env
CLBD_RUN_DIR=$RUN_DIR
clbd_job_banner
clbd_srun "${CLBD_CMD[@]}" test --config "$RUN_DIR/config.yaml" "$@" \
    "--trainer.strategy=${CLBD_STRATEGY:-auto}" "--trainer.num_nodes=$CLBD_NUM_NODES" \
    "--trainer.devices=$CLBD_DEVICES" "--trainer.default_root_dir=$RUN_DIR" --ckpt_path "$CLBD_CKPT_FILE"
echo "clbd: evaluation of $CLBD_CKPT_FILE ended; results in $(dirname "$CLBD_CKPT_FILE")/metrics.json"
