#!/bin/bash
# One arm of an experiment, as a task of the job array slurm/experiment.sh submits (or the assembling job).
#
#   sbatch --array=0-N slurm/experiment_arm.sh PLAN OUT ARMS_FILE   # task i runs the arm on line i+1
#   sbatch slurm/experiment_arm.sh PLAN OUT --assemble              # the table from the finished arms
#
# The task runs `clbd experiment --config PLAN --out OUT --arm ID`, which resumes the arm's interrupted fit from its
# newest checkpoint (hpc_ckpt_N.ckpt after a preemption, else last.ckpt) and skips what is finished.
#SBATCH --job-name=clbd-arm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
CLBD_ROOT=${CLBD_ROOT:-${SLURM_SUBMIT_DIR:?submit this script with sbatch}}
[[ -f $CLBD_ROOT/slurm/_common.sh ]] || {
    echo "clbd: ERROR: $CLBD_ROOT/slurm/_common.sh not found: run sbatch from the clbd checkout or set CLBD_ROOT" >&2
    exit 1
}
# shellcheck source=slurm/_common.sh
source "$CLBD_ROOT/slurm/_common.sh"
clbd_enter_root
(($# == 3)) || clbd_die "usage: sbatch [--array=0-N] slurm/experiment_arm.sh PLAN OUT ARMS_FILE|--assemble"
PLAN=$1
OUT=$2
clbd_command
if [[ $3 == --assemble ]]; then
    clbd_job_banner
    exec "${CLBD_CMD[@]}" experiment --config "$PLAN" --out "$OUT" --assemble
fi
clbd_require_vars SLURM_ARRAY_TASK_ID
clbd_require_path "$3" "arms file (third argument)"
ARM=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$3")
[[ -n $ARM ]] || clbd_die "$3 has no line $((SLURM_ARRAY_TASK_ID + 1)) for array task $SLURM_ARRAY_TASK_ID"
clbd_dist_env
clbd_job_banner
echo "clbd: arm $ARM of $PLAN (task $SLURM_ARRAY_TASK_ID of array ${SLURM_ARRAY_JOB_ID:-?})"
clbd_srun "${CLBD_CMD[@]}" experiment --config "$PLAN" --out "$OUT" --arm "$ARM"
