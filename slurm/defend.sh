#!/bin/bash
# Defense fine-tuning of a poisoned checkpoint (CleanCLIP, TA-Cleaner, MCLDef, UBT: configs/defense/*.yaml).
#
#   sbatch slurm/defend.sh CONFIG CHECKPOINT [OPTIONS] [CLBD OVERRIDES...]
#   sbatch slurm/defend.sh configs/defense/cleanclip.yaml runs/clip-cc3m-1234 \
#       --config configs/attack/badnet_clip.yaml --data.init_args.train_shards=data/cc3m-clean-100k
#
# CHECKPOINT: the poisoned checkpoint file, a run directory (its checkpoints/last.ckpt), or a DeepSpeed
# checkpoint folder (its fp32 copy RUN/consolidated/<name> is written once and used). It becomes
# --model.init_args.checkpoint; the poisoned run is only read. Options: --strategy NAME (= CLBD_STRATEGY).
# Run directory runs/<job name>-<job id>; requeue and resume as slurm/pretrain_cc3m.sh (docs/slurm.md).
#SBATCH --job-name=defend
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@90
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

(($# >= 2)) || clbd_die "usage: sbatch slurm/defend.sh CONFIG CHECKPOINT [--strategy NAME] [clbd overrides...]"
DEFENSE_CONFIG=$1
POISONED=$2
shift 2
clbd_parse_options "strategy:CLBD_STRATEGY" "$@"
clbd_refuse_override model.checkpoint "the poisoned checkpoint is the script's second argument" "${CLBD_OVERRIDES[@]}"
clbd_abspath "$DEFENSE_CONFIG"
clbd_require_path "$CLBD_ABSPATH" "defense config (first argument)"
DEFENSE_CONFIG=$CLBD_ABSPATH
clbd_abspath "$POISONED"
clbd_require_path "$CLBD_ABSPATH" "poisoned checkpoint (second argument)"
POISONED=$CLBD_ABSPATH
if [[ -d $POISONED && -f $POISONED/config.yaml ]]; then
    POISONED=$POISONED/checkpoints/last.ckpt # a run directory
    clbd_require_path "$POISONED" "poisoned checkpoint (the run's last checkpoint)"
fi
clbd_command
clbd_consolidated "$POISONED"
CLBD_BASE_ARGS=(--config "$DEFENSE_CONFIG")
CLBD_MANAGED_ARGS=("--model.init_args.checkpoint=$CLBD_CKPT_FILE")
clbd_fit "${CLBD_RUNS:-runs}" "${CLBD_OVERRIDES[@]}"
