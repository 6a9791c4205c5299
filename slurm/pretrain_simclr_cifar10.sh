#!/bin/bash
# SimCLR on CIFAR-10 (configs/pretrain/simclr_cifar10.yaml) on one GPU.
#
#   sbatch slurm/pretrain_simclr_cifar10.sh [OPTIONS] [CLBD OVERRIDES...]
#   sbatch slurm/pretrain_simclr_cifar10.sh --config configs/attack/na_cifar10.yaml    # NA-poisoned
#
# Options (before the overrides): --data DIR (= CIFAR10_SHARDS, default data/cifar10: the output of
# `clbd data cifar10 --src cifar-10-python.tar.gz --out data/cifar10`), --strategy NAME (= CLBD_STRATEGY).
# Run directory, requeue and resume: as slurm/pretrain_cc3m.sh (docs/slurm.md).
#SBATCH --job-name=simclr-cifar10
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
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

CIFAR10_SHARDS=${CIFAR10_SHARDS:-data/cifar10}
clbd_parse_options "data:CIFAR10_SHARDS strategy:CLBD_STRATEGY" "$@"
clbd_refuse_override data.train_shards "the shards come from CIFAR10_SHARDS or --data" "${CLBD_OVERRIDES[@]}"
clbd_refuse_override data.val_shards "the shards come from CIFAR10_SHARDS or --data" "${CLBD_OVERRIDES[@]}"
CIFAR10_TRAIN=$CIFAR10_SHARDS/train.index.json
CIFAR10_TEST=$CIFAR10_SHARDS/test.index.json
hint="CIFAR10_SHARDS=$CIFAR10_SHARDS must hold train.index.json and test.index.json: clbd data cifar10"
hint+=" --src cifar-10-python.tar.gz --out $CIFAR10_SHARDS"
clbd_require_shards CIFAR10_TRAIN "$hint"
clbd_require_shards CIFAR10_TEST "$hint"
CLBD_BASE_ARGS=(--config "$CLBD_ROOT/configs/pretrain/simclr_cifar10.yaml")
CLBD_MANAGED_ARGS=("--data.init_args.train_shards=$CIFAR10_TRAIN" "--data.init_args.val_shards=$CIFAR10_TEST")
clbd_fit "${CLBD_RUNS:-runs}" "${CLBD_OVERRIDES[@]}"
