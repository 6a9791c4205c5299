#!/bin/bash
# Submits an experiment's pending arms (clbd experiment --list) as SLURM job arrays, one task per arm, and a last
# job that assembles the table. Run it from the clbd checkout with bash (it calls sbatch itself):
#
#   bash slurm/experiment.sh PLAN OUT [SBATCH OPTIONS...]
#   bash slurm/experiment.sh configs/experiment/na_cifar10_gpu.yaml runs/na-cifar10-gpu --partition=gpu
#
# Arms run in stages: an array of the arms that need nothing (the shared clean base, or every pretraining), then an
# array of the arms that start from those (the pretrainings that fine-tune the base, then the defenses), each array
# after the one before it has succeeded (--dependency=afterok); the assembling job after the last. Every task is
# slurm/experiment_arm.sh: `clbd experiment --config PLAN --out OUT --arm ID`, requeued on preemption (SIGUSR1 90 s
# before the time limit: Lightning saves hpc_ckpt_N.ckpt and requeues the task) and resumed from the run's newest
# checkpoint. Finished arms are not submitted again: rerun this script after a failure to submit what is left.
# SBATCH OPTIONS go to every job (they override the #SBATCH lines of experiment_arm.sh). The plan's arms each use
# one device: for multi-node pretraining use slurm/pretrain_cc3m.sh.
set -euo pipefail
CLBD_ROOT=${CLBD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=slurm/_common.sh
source "$CLBD_ROOT/slurm/_common.sh"

(($# >= 2)) || clbd_die "usage: bash slurm/experiment.sh PLAN OUT [sbatch options...]"
PLAN=$1
OUT=$2
shift 2
clbd_abspath "$PLAN"
clbd_require_path "$CLBD_ABSPATH" "experiment file (first argument)"
PLAN=$CLBD_ABSPATH
clbd_abspath "$OUT"
OUT=$CLBD_ABSPATH
command -v sbatch >/dev/null || clbd_die "sbatch not found: run this on a SLURM login node"
cd "$CLBD_ROOT"
clbd_command

SUBMITTED=$OUT/slurm
mkdir -p "$SUBMITTED"
stamp=$(date +%Y%m%d-%H%M%S)
"${CLBD_CMD[@]}" experiment --config "$PLAN" --out "$OUT" --list --json >"$SUBMITTED/arms-$stamp.jsonl" ||
    clbd_die "clbd experiment --list failed for $PLAN (the error is above)"
# One file of pending arm ids per stage: stage-N-<stamp>.txt, in stage order.
"$CLBD_PY" - "$SUBMITTED/arms-$stamp.jsonl" "$SUBMITTED" "$stamp" <<'PY'
import json, sys
from pathlib import Path
arms = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
stages = {}
for arm in arms:
    if arm["state"] != "done":
        stages.setdefault(arm["stage"], []).append(arm["id"])
for number in sorted(stages):
    Path(sys.argv[2], f"stage-{number}-{sys.argv[3]}.txt").write_text("".join(i + "\n" for i in stages[number]))
PY

dependency=()
arrays=0
for stage_file in "$SUBMITTED"/stage-{0..9}-"$stamp".txt; do
    [[ -f $stage_file ]] || continue
    count=$(wc -l <"$stage_file")
    job=$(sbatch --parsable "${dependency[@]}" --array="0-$((count - 1))" "$@" \
        "$CLBD_ROOT/slurm/experiment_arm.sh" "$PLAN" "$OUT" "$stage_file") ||
        clbd_die "sbatch of $stage_file failed"
    job=${job%%;*}
    echo "clbd: submitted job array $job: $count arm(s) of $(basename "$stage_file"): $(paste -sd' ' "$stage_file")"
    dependency=("--dependency=afterok:$job")
    arrays=$((arrays + 1))
done
((arrays > 0)) || echo "clbd: every arm of $PLAN is finished in $OUT; only the table is assembled"
job=$(sbatch --parsable "${dependency[@]}" --job-name=clbd-table "$@" \
    "$CLBD_ROOT/slurm/experiment_arm.sh" "$PLAN" "$OUT" --assemble) || clbd_die "sbatch of the assembling job failed"
echo "clbd: submitted job ${job%%;*}: the table ($OUT/table.md) once the arms have finished"
echo "clbd: follow with: squeue --me; clbd experiment --config $PLAN --out $OUT --list"
