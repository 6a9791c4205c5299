#!/usr/bin/env bash
# The prepared GPU check: one call on one GPU machine (one H100 or H200, 16 cores), ~9 minutes (540 s), run from the
# repository root. Everything it measures lands as files in OUT as each stage ends, so a late failure loses nothing:
#
#   gpu_check.log        everything printed             env.txt          GPU, driver, python, package versions
#   pytest_gpu.xml       the gpu-marked tests (JUnit)   gpu_throughput.json   SimCLR's speed settings vs eager, profile, CLIP
#   arms/arms.tar        one archive per finished experiment arm (benchmarks/arm_bundle.py)
#   arms/arms_schedule.json  which arm ran when          summary.txt      the table printed last
#   na_run.tar.gz        stage na: config, poison summary, test metrics.json, one line per epoch, metrics.csv
# At most 8 files: the device tool brings back no more (the check says so at the end if a call left more).
# Back home: python benchmarks/gpu_collect.py OUT.
#
# Usage:  benchmarks/gpu_check.sh OUT [CIFAR10_JPG_TAR_GZ]     (default archive: .gpu_data/cifar10-jpg.tar.gz)
#
# The machine has torch, torchvision, lightning, torchmetrics, tensorboard but no registry: the packages clbd needs
# beyond those come as wheels in .whl/ (benchmarks/gpu_wheels.sh makes it), installed with pip --no-index
# --no-deps into a folder of their own (torch is never reinstalled). Carry .whl and the archive's folder.
#
# Stages, each time-boxed (seconds from the start of the whole check, CLBD_GPU_CHECK_BUDGET_S in all, default 540):
#   install (wheels, DeepSpeed's among them: pure Python, its ops JIT-built if used) -> convert (clbd data cifar10)
#   -> pytest -m gpu -> benchmarks/gpu_throughput.py (eager and every speed setting no earlier call measured on this
#   GPU, SimCLR's and CLIP's, each against eager in this call; picks the setting that trains a 20-epoch arm soonest)
#   -> the experiment arms (benchmarks/gpu_arms.py: the highest-priority arms of configs/experiment/na_cifar10_gpu.yaml
#   not yet in results/ that fit, with the fastest speed setting, one archive each in OUT/arms/; two at once when
#   the throughput stage measured two at once paying, OUT/arms/arms_schedule.json says who ran when)
#   -> [stage na, off by default: NA on CIFAR-10 SimCLR with the fastest setting for the epochs that fit -> clbd test]
#
# Settings (environment): CLBD_PYTHON (python3), CLBD_GPU_CHECK_WORK (scratch folder, /tmp/clbd_gpu_check),
# CLBD_GPU_CHECK_STAGES (comma list of pytest,throughput,arms,na; default pytest,throughput,arms),
# CLBD_GPU_ARMS_PLAN (the experiment the arms stage takes its arms from), CLBD_GPU_CHECK_SKIP_INSTALL=1 (the
# packages are already importable), CLBD_GPU_NA_EPOCH_S (expected seconds per NA epoch incl. monitors, sets the
# epoch count; default 5 with device views, else 9), CLBD_GPU_NA_WORKERS (16), CLBD_GPU_NA_DEVICE_VIEWS (1, the default: views made on the GPU; 0: in the loaders; the run falls back to 0,
# and to the first check's plain settings, by itself when the GPU config fails before its first epoch ends),
# CLBD_GPU_NA_ARGS (extra clbd fit arguments, last: they override), CLBD_GPU_CHECK_MAXCOUNT (samples per shard, 625),
# CLBD_GPU_THROUGHPUT_S (the throughput stage's limit, 240), CLBD_GPU_THROUGHPUT_SETTINGS (its --simclr-settings;
# default: all but compile_max_autotune, whose tuning alone can take minutes), CLBD_GPU_NA_FASTEST (1: the NA run
# takes the fastest setting the throughput stage measured; 0: the GPU config as it is), CLBD_GPU_ARMS_PAIR_MIN (1.15:
# the arms run two at once when the pair's views/s over one alone's measured above it), CLBD_GPU_ARMS_PARALLEL (N:
# arms at once, whatever was measured), CLBD_GPU_ARMS_MIN_S (260: what the arms stage is kept; the pytest and
# throughput stages get less when the budget is short), CLBD_GPU_ARMS_EPOCH_MARGIN (1.25: the arms' first epoch
# estimate over the fastest setting's measured step + device views), CLBD_GPU_THROUGHPUT_CLIP_SETTINGS (its
# --clip-settings; default all), CLBD_GPU_ARMS_MODEL_ALONE=1 (start a model arm even when the defense arms that
# start from it would not fit after it: they then never run for that seed), CLBD_GPU_THROUGHPUT_REMEASURE=1
# (measure every setting again; by default what results/gpu_throughput/ holds for this GPU is not measured again, so
# the table grows call by call).
# CLBD_GPU_CHECK_CPU_DRYRUN=1 rehearses every stage on a CPU with tiny sizes (seconds, not minutes): a narrow
# ResNet, 2 batches per epoch, a small poison budget, the quick throughput run.
set -uo pipefail

out=${1:?usage: benchmarks/gpu_check.sh OUT [CIFAR10_JPG_TAR_GZ]}
archive=${2:-}
mkdir -p "$out" && out=$(cd "$out" && pwd)
[[ -n $archive ]] && archive=$(realpath -m "$archive")
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
archive=${archive:-$repo/.gpu_data/cifar10-jpg.tar.gz}

PY=${CLBD_PYTHON:-python3}
wheels=${CLBD_GPU_CHECK_WHEELS:-$repo/.whl}
dry=${CLBD_GPU_CHECK_CPU_DRYRUN:-0}
budget=${CLBD_GPU_CHECK_BUDGET_S:-$([[ $dry == 1 ]] && echo 1500 || echo 540)}
work=${CLBD_GPU_CHECK_WORK:-/tmp/clbd_gpu_check}
stages=${CLBD_GPU_CHECK_STAGES:-pytest,throughput,arms}
workers=${CLBD_GPU_NA_WORKERS:-16}
device_views=${CLBD_GPU_NA_DEVICE_VIEWS:-1}
epoch_guess=${CLBD_GPU_NA_EPOCH_S:-$([[ $device_views == 1 ]] && echo 5 || echo 9)}
started=$(date +%s)

exec > >(tee -a "$out/gpu_check.log") 2>&1
elapsed() { echo $(($(date +%s) - started)); }
left() { echo $((budget - $(date +%s) + started)); }
stage() { echo; echo "=== [$(elapsed) s] $*"; }
has_stage() { [[ ",$stages," == *",$1,"* ]]; }
CLBD=("$PY" -c 'import sys; from clbd import main; sys.exit(main())')
# What the arms stage is kept, whatever the stages before it take: one 20-epoch arm at the first check's speed
# (gpu_arms.py estimates ~232 s) and the stage's 15 s reserve.
arms_min=$(has_stage arms && echo "${CLBD_GPU_ARMS_MIN_S:-260}" || echo 0)

rm -rf "$work" && mkdir -p "$work"
export PYTHONUNBUFFERED=1 PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
echo "gpu_check: budget ${budget} s (the arms kept at least ${arms_min} s), dry run ${dry}, stages ${stages}, archive ${archive}, work ${work}"
[[ -f $archive ]] || { echo "gpu_check: no CIFAR-10 archive at $archive"; exit 2; }

# ---- install ---------------------------------------------------------------------------------------------------
stage "install"
if [[ ${CLBD_GPU_CHECK_SKIP_INSTALL:-0} != 1 ]]; then
    site=$work/site
    t0=$(date +%s)
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "$wheels"/*.whl || { echo "gpu_check: wheel install failed"; exit 3; }
    export PYTHONPATH=$repo:$site${PYTHONPATH#"$repo"}
    echo "wheels installed in $(($(date +%s) - t0)) s"
fi
"$PY" - <<'EOF' || { echo "gpu_check: clbd's packages do not import"; exit 3; }
import importlib, torch
for name in ("open_clip", "webdataset", "torchdata", "jsonargparse", "docstring_parser", "typeshed_client", "timm"):
    module = importlib.import_module(name)
    print(f"  {name} {getattr(module, '__version__', '')} from {module.__file__}")
try:  # only the DeepSpeed tests need it; they skip without it
    import deepspeed
    print(f"  deepspeed {deepspeed.__version__} from {deepspeed.__file__}")
except Exception as exc:
    print(f"  deepspeed does not import: {type(exc).__name__}: {exc}")
import clbd  # noqa: F401  (clbd itself)
print(f"  torch {torch.__version__}, cuda {torch.cuda.is_available()}")
EOF
{
    date -u; nvidia-smi 2>&1 || echo "no nvidia-smi"; echo; "$PY" -V; nproc; free -g 2>/dev/null
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|lightning|torchmetrics|numpy|pillow|triton|timm|open.clip|huggingface)"
} >"$out/env.txt" 2>&1

# ---- convert ---------------------------------------------------------------------------------------------------
stage "convert $archive"
data=$work/data/cifar10
t0=$(date +%s)
# 625 per shard: 80 training shards, so 16 loader processes get 5 each (a shard is a loader's unit of work).
timeout 180 "${CLBD[@]}" data cifar10 --src "$archive" --out "$data" --maxcount "${CLBD_GPU_CHECK_MAXCOUNT:-625}" --quiet \
    || { echo "gpu_check: conversion failed"; exit 4; }
echo "converted in $(($(date +%s) - t0)) s"
# gpu_throughput.py finds the converted set in its cache under the name it would have given it.
bench_cache=$work/bench_cache && mkdir -p "$bench_cache"
ln -s "$data" "$bench_cache/cifar10-$(stat -c %s "$archive")-$(stat -c %Y "$archive")"


# ---- 1. the gpu-marked tests -------------------------------------------------------------------------------------
if has_stage pytest; then
    stage "pytest -m gpu"
    # 180 s: DeepSpeed ZeRO-2/3, BadCLIP, the device transforms on CUDA, the GPU config's fit + test, a compiled encoder.
    # At most 180 s, and no more than leaves the throughput stage 120 s and the arms their CLBD_GPU_ARMS_MIN_S.
    limit=$(( $(left) - arms_min - 120 )); (( limit > 180 )) && limit=180; (( limit < 60 )) && limit=60
    [[ $dry == 1 ]] && limit=60
    echo "pytest: ${limit} s at most ($(left) s left, ${arms_min} s kept for the arms)"
    # Per-test limit (pytest-timeout, in the image): a hung test fails alone and the JUnit file is still written,
    # which a kill of the whole pytest by the stage's timeout would prevent.
    per_test=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout $(( (limit - 20) / 2 )))
    timeout -k 10 "$limit" "$PY" -m pytest -m gpu -v -rA -p no:cacheprovider "${per_test[@]}" \
        --junitxml="$out/pytest_gpu.xml" tests
    echo "pytest exit $?"
fi

# ---- 2. throughput ---------------------------------------------------------------------------------------------
if has_stage throughput; then
    stage "benchmarks/gpu_throughput.py"
    # SimCLR: eager, then each setting alone (channels-last, cuDNN autotuning, BatchNorm in fp32, fp16 + scaler, fused
    # optimiser; ~10 s each), CLIP and nvjpeg (~30 s), then the compiled ones (all together first, then compile alone
    # and with CUDA graphs; about a minute of compilation each). The JSON is rewritten after each: a cut keeps the rest.
    # CLBD_GPU_THROUGHPUT_S (240) at most, and no more than leaves the arms CLBD_GPU_ARMS_MIN_S (at least 90 s).
    throughput_limit=${CLBD_GPU_THROUGHPUT_S:-240}
    limit=$(( $(left) - arms_min )); (( limit > throughput_limit )) && limit=$throughput_limit; (( limit < 90 )) && limit=90
    (( limit > $(left) )) && limit=$(left)
    echo "throughput: ${limit} s at most ($(left) s left, ${arms_min} s kept for the arms)"
    # --time-limit: "two at once" (the fastest setting in two processes vs one) runs only if it fits the rest.
    bench=(--data "$archive" --cache "$bench_cache" --json "$out/gpu_throughput.json" --time-limit $((limit - 15)))
    # What earlier calls measured on this device is not measured again (the table grows call by call; eager always).
    [[ ${CLBD_GPU_THROUGHPUT_REMEASURE:-0} == 1 ]] || bench+=(--measured "$repo/results/gpu_throughput")
    [[ -n ${CLBD_GPU_THROUGHPUT_CLIP_SETTINGS:-} ]] && bench+=(--clip-settings "$CLBD_GPU_THROUGHPUT_CLIP_SETTINGS")
    if [[ $dry == 1 ]]; then
        bench+=(--device cpu --quick)
    else
        bench+=(--repeats 2 --simclr-settings "${CLBD_GPU_THROUGHPUT_SETTINGS:-eager,channels_last,cudnn_benchmark,batchnorm_fp32,fp16,optimizer,all,compile,compile_cudagraphs}")
    fi
    timeout -k 10 "$limit" "$PY" benchmarks/gpu_throughput.py "${bench[@]}"
    echo "throughput exit $?"
fi

# The fastest SimCLR setting the throughput stage measured, as clbd fit arguments (none: the GPU config as it is).
fastest_args=()
if [[ ${CLBD_GPU_NA_FASTEST:-1} == 1 && -f $out/gpu_throughput.json ]]; then
    mapfile -t fastest_args < <("$PY" -c 'import json, sys
best = json.load(open(sys.argv[1])).get("fastest_simclr_setting")
print("\n".join(best["fit_args"]) if best else "")' "$out/gpu_throughput.json" | sed '/^$/d')
    echo "fastest SimCLR setting's arguments: ${fastest_args[*]:-none}"
fi

# Two arms at once when the throughput stage measured it paying: the pair's views/s over one alone's above
# CLBD_GPU_ARMS_PAIR_MIN (1.15: below that the gain is within what a short measurement and the arms' start-up and
# evaluation, which it does not cover, can eat), with its measured slowdown for the estimates; else one at a time.
# CLBD_GPU_ARMS_PARALLEL=N forces N (the measured slowdown if any, else gpu_arms.py's default).
# The arms' first estimate of an epoch: the fastest setting's measured step + device views, times
# CLBD_GPU_ARMS_EPOCH_MARGIN (1.25: the first check's real epoch was 1.07x its step + views; loaders and start of
# each epoch on top), when the arms take that setting; else gpu_arms.py's 6.1 s. The first arm's own epochs replace it.
mapfile -t arms_parallel < <("$PY" - "$out/gpu_throughput.json" "${CLBD_GPU_ARMS_PAIR_MIN:-1.15}" \
    "${CLBD_GPU_ARMS_PARALLEL:-}" "${#fastest_args[@]}" "${CLBD_GPU_ARMS_EPOCH_MARGIN:-1.25}" <<'EOF'
import json, sys
path, least, forced, fastest_used, margin = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
try:
    data = json.load(open(path))
except (OSError, ValueError):
    data = {}
pair = data.get("two_at_once") or {}
fastest = data.get("fastest_simclr_setting") or {}
epoch, compiling = fastest.get("epoch_s_with_device_views"), fastest.get("extra_start_s") or 0
ratio, slowdown = pair.get("ratio"), pair.get("slowdown")
if ratio:
    measured = f"two at once measured x{ratio:.2f} of one alone ({pair['setting']})"
else:
    measured = f"two at once not measured ({pair.get('skipped') or pair.get('error') or 'no throughput result'})"
if forced:
    parallel, why = int(forced), f"CLBD_GPU_ARMS_PARALLEL={forced}; {measured}"
elif ratio and ratio > least:
    parallel, why = 2, f"{measured} > {least}"
else:
    parallel, why = 1, measured + (f" <= {least}" if ratio else "")
timed = epoch and fastest_used  # start-up: gpu_arms.py's 60 s + the setting's compilation in each arm
print(parallel, f"{slowdown:.3f}" if slowdown else "", why, f"{epoch * margin:.2f}" if timed else "",
      f"{60 + compiling:.0f}" if timed else "", sep="\n")
EOF
)
parallel_args=(--parallel "${arms_parallel[0]:-1}" --parallel-why "${arms_parallel[2]:-}")
[[ -n ${arms_parallel[1]:-} ]] && parallel_args+=(--slowdown "${arms_parallel[1]}")

# ---- 3. the experiment arms ----------------------------------------------------------------------------------------
# The CIFAR-10 comparison (configs/experiment/na_cifar10_gpu.yaml): the highest-priority arms not yet in
# results/na_cifar10_gpu that fit the time left (estimates printed first), with the fastest setting's speed arguments;
# each finished arm is appended to OUT/arms/arms.tar (no checkpoint). Back home: benchmarks/gpu_collect.py OUT
# unpacks them into results/na_cifar10_gpu/ and assembles. In the dry run: the plan shrunk, its first three arms.
if has_stage arms; then
    stage "experiment arms (configs/experiment/na_cifar10_gpu.yaml)"
    reserve=$(has_stage na && echo 200 || echo 15)
    seconds=$(( $(left) - reserve ))
    arms=(--plan "${CLBD_GPU_ARMS_PLAN:-configs/experiment/na_cifar10_gpu.yaml}" --seconds "$seconds"
        --work "$work/arms" --out "$out/arms" --data "$data" --speed-args="${fastest_args[*]}" "${parallel_args[@]}")
    if [[ -n ${arms_parallel[3]:-} ]]; then
        arms+=(--epoch-s "${arms_parallel[3]}" --startup-s "${arms_parallel[4]}")
        echo "arms: estimates at ${arms_parallel[3]} s per epoch (the fastest setting measured, x${CLBD_GPU_ARMS_EPOCH_MARGIN:-1.25}), ${arms_parallel[4]} s start-up and test each"
    fi
    [[ ${CLBD_GPU_ARMS_MODEL_ALONE:-0} == 1 ]] && arms+=(--model-alone)
    [[ $dry == 1 ]] && arms+=(--shrink --max-arms 3 --epoch-s 1)  # last: argparse keeps the last --epoch-s
    echo "arms: ${arms_parallel[0]:-1} at a time: ${arms_parallel[2]:-}"
    timeout -k 15 $((seconds + 10)) "$PY" benchmarks/gpu_arms.py "${arms[@]}"
    echo "arms exit $?"
fi

# ---- 4. NA on CIFAR-10 SimCLR, then clbd test --------------------------------------------------------------------
if has_stage na; then
    stage "NA on CIFAR-10 SimCLR"
    run=$work/runs/na_cifar10
    test_reserve=$([[ $dry == 1 ]] && echo 60 || echo 75)
    fit_seconds=$(( $(left) - test_reserve - 30 ))
    if [[ $dry == 1 ]]; then
        epochs=2
    else
        epochs=$(( (fit_seconds - 40) / epoch_guess ))
    fi
    # Lightning's max_time counts training only: leave ~40 s for start-up (catalog, poison plan, workers) and the end.
    train_seconds=$((fit_seconds - 40))
    if (( train_seconds < 20 || epochs < 1 )); then
        echo "gpu_check: no time left for the NA run (${fit_seconds} s)"
    else
        fit=(fit --config configs/pretrain/simclr_cifar10_gpu.yaml --config configs/attack/na_cifar10.yaml
            --trainer.default_root_dir="$run" --trainer.max_epochs="$epochs"
            --trainer.max_time="$(printf '00:00:%02d:%02d' $((train_seconds / 60)) $((train_seconds % 60)))"
            --trainer.enable_progress_bar=false --trainer.log_every_n_steps=20
            --checkpoint.every_n_train_steps=0 --checkpoint.every_n_epochs=5 --checkpoint.save_top_k=1
            --trainer.callbacks+=lightning_modules.epoch_timer.EpochTimer --trainer.callbacks.path="$out/na_epochs.jsonl"
            --data.init_args.train_shards="$data/train.index.json" --data.init_args.val_shards="$data/test.index.json"
            "${fastest_args[@]}")
        if [[ $dry == 1 ]]; then
            fit+=(--trainer.accelerator=cpu --trainer.precision=32-true --data.init_args.pin_memory=false
                --trainer.limit_train_batches=2
                --trainer.limit_val_batches=2 --trainer.num_sanity_val_steps=0 --model.init_args.width=8
                --model.init_args.proj_hidden_dim=64 --data.init_args.batch_size=32 --data.init_args.eval_batch_size=64
                --data.init_args.num_workers=2 --data.init_args.knn_bank_size=256
                --data.init_args.attack.init_args.count=64 --data.init_args.attack.init_args.reference_pool_size=32)
        else
            fit+=(--data.init_args.num_workers="$workers")
            # Validation every 2nd epoch when there are many: the kNN monitor reads 50k bank + 2 x 10k test images.
            (( epochs >= 10 )) && fit+=(--trainer.check_val_every_n_epoch=2)
        fi
        [[ $device_views == 1 ]] || fit+=(--data.init_args.views_on_device=false)
        # shellcheck disable=SC2206
        fit+=(${CLBD_GPU_NA_ARGS:-})
        echo "NA: ${epochs} epochs planned, stopped after ${train_seconds} s of training if not done (${fit_seconds} s, ~${epoch_guess} s each), device views ${device_views}"
        (
            while sleep 15; do [[ -f $run/metrics.csv ]] && cp "$run/metrics.csv" "$out/na_metrics.csv"; done
        ) &
        copier=$!
        t0=$(date +%s)
        timeout -k 15 $((fit_seconds + 30)) "${CLBD[@]}" "${fit[@]}"
        status=$?
        echo "fit exit $status after $(($(date +%s) - t0)) s"
        if (( status != 0 )) && [[ $device_views == 1 && ! -s $out/na_epochs.jsonl ]]; then
            # The GPU settings failed before an epoch ended: the same run as the first GPU check made it (views in the
            # loaders, NCHW, no cuDNN autotuning, no data in memory, bf16, no compilation), which is known to work.
            fit_seconds=$(( $(left) - test_reserve - 30 ))
            train_seconds=$((fit_seconds - 40))
            epochs=$(( train_seconds / (2 * epoch_guess) ))
            if (( train_seconds >= 20 && epochs >= 1 )); then
                stage "NA again with plain settings (${epochs} epochs, ${train_seconds} s)"
                rm -rf "$run"
                fit+=(--data.init_args.views_on_device=false --data.init_args.resident=false
                    --data.init_args.cache_eval_batches=false --data.init_args.channels_last=false
                    --model.init_args.channels_last=false --trainer.benchmark=false --trainer.max_epochs="$epochs"
                    --model.init_args.batchnorm_fp32=false --model.init_args.optimizer_impl=auto
                    --model.init_args.compile=false --trainer.precision=bf16-mixed
                    --trainer.max_time="$(printf '00:00:%02d:%02d' $((train_seconds / 60)) $((train_seconds % 60)))")
                timeout -k 15 $((fit_seconds + 30)) "${CLBD[@]}" "${fit[@]}"
                echo "fit exit $? after $(($(date +%s) - t0)) s"
            fi
        fi
        kill "$copier" 2>/dev/null; wait "$copier" 2>/dev/null
        [[ -f $run/metrics.csv ]] && cp "$run/metrics.csv" "$out/na_metrics.csv"

        stage "clbd test (the NA run's last checkpoint)"
        if [[ -f $run/checkpoints/last.ckpt ]]; then
            test_args=(test --config "$run/config.yaml" --ckpt_path "$run/checkpoints/last.ckpt")
            [[ $dry == 1 ]] && test_args+=(--model.init_args.probe_epochs=2 --trainer.limit_test_batches=2)
            timeout -k 10 $(( $(left) > 20 ? $(left) : 20 )) "${CLBD[@]}" "${test_args[@]}"
            echo "test exit $?"
        else
            echo "gpu_check: no last.ckpt in $run/checkpoints: nothing to test"
        fi
        # The epoch lines and metrics go into the archive too (the loose copies are removed after the summary).
        (cd "$run" && tar czf "$out/na_run.tar.gz" --exclude='*.ckpt' --exclude=metrics.csv . \
            -C "$out" $(cd "$out" && ls na_epochs.jsonl na_metrics.csv 2>/dev/null) 2>/dev/null)
    fi
fi

# ---- summary ---------------------------------------------------------------------------------------------------
stage "summary"
"$PY" benchmarks/gpu_check_report.py "$out" --work "$work" | tee "$out/summary.txt"
[[ -f $out/na_run.tar.gz ]] && rm -f "$out/na_epochs.jsonl" "$out/na_metrics.csv"  # both inside the archive
# The device tool brings back at most 8 files, two folders down at most.
mapfile -t files_back < <(cd "$out" && find . -type f | sort)
(( ${#files_back[@]} <= 8 )) || echo "gpu_check: WARNING: ${#files_back[@]} files in $out; only 8 come back: ${files_back[*]}"
echo "gpu_check: done in $(elapsed) s, ${#files_back[@]} files in $out"
