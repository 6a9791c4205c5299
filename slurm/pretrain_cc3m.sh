#!/bin/bash
# CLIP from scratch on CC3M (configs/pretrain/clip_cc3m.yaml), one task per GPU on N nodes.
#
#   CC3M_TRAIN=data/cc3m/train.index.json sbatch slurm/pretrain_cc3m.sh [OPTIONS] [CLBD OVERRIDES...]
#
# Options (before the overrides): --train PATH (= CC3M_TRAIN), --val PATH (= CC3M_VAL), --strategy NAME
# (= CLBD_STRATEGY, e.g. deepspeed_stage_2). Everything else goes to `clbd fit`, after the config, e.g.
# --config configs/attack/badnet_clip.yaml --model.init_args.lr=1e-3. The layout comes from the #SBATCH lines
# (or the same options on the sbatch command line): --trainer.num_nodes / --trainer.devices follow them.
#
# The run directory is runs/<job name>-<job id> (CLBD_RUNS for another parent folder, CLBD_RUN_DIR to resume a
# given run). SIGUSR1 90 s before the time limit (or on preemption) makes Lightning save hpc_ckpt_N.ckpt there
# and requeue the job; the requeued job (same id, same directory) resumes from the newest checkpoint. See
# docs/slurm.md.
#SBATCH --job-name=clip-cc3m
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
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

clbd_parse_options "train:CC3M_TRAIN val:CC3M_VAL strategy:CLBD_STRATEGY" "$@"
clbd_refuse_override data.train_shards "the training shards come from CC3M_TRAIN or --train" "${CLBD_OVERRIDES[@]}"
clbd_require_shards CC3M_TRAIN "give CC3M's img2dataset output, indexed with 'clbd data img2dataset --src DIR', as\
 CC3M_TRAIN=DIR/train.index.json (or DIR) or --train PATH; see docs/slurm.md"
CLBD_MANAGED_ARGS=("--data.init_args.train_shards=$CC3M_TRAIN")
if [[ -n ${CC3M_VAL:-} ]]; then
    clbd_refuse_override data.val_shards "the monitor's shards come from CC3M_VAL or --val" "${CLBD_OVERRIDES[@]}"
    clbd_require_shards CC3M_VAL "labelled shards with class names for the zero-shot monitor, e.g. ImageNet val\
 converted with 'clbd data folder'"
    CLBD_MANAGED_ARGS+=("--data.init_args.val_shards=$CC3M_VAL")
fi
CLBD_BASE_ARGS=(--config "$CLBD_ROOT/configs/pretrain/clip_cc3m.yaml")
clbd_fit "${CLBD_RUNS:-runs}" "${CLBD_OVERRIDES[@]}"
