"""The speed settings' table, from every GPU call's ``gpu_throughput.json`` kept in ``results/gpu_throughput/``.

Each call measures eager and the settings no earlier call measured on the same device (``gpu_throughput.py
--measured``), so the table grows call by call; every ratio is against eager **in the same call** (views/s of
different calls are never divided). With ``--arms``, the real epochs of the experiment arms (their
``provenance.json``: loaders, views on the device, the speed arguments they trained with) stand beside the step's
estimate for the goal's verdict: SimCLR on CIFAR-10 at 1.5 s per epoch, evaluation under a tenth of training, CLIP
ViT-B-32 at 35% MFU.

    python benchmarks/gpu_throughput_table.py results/gpu_throughput --arms results/na_cifar10_gpu \\
        --docs docs/benchmarks.md          # the block <!-- clbd-table: gpu_throughput --> ... of the document

A call's JSON comes back from the GPU machine as ``OUT/gpu_throughput.json``; keep it as
``results/gpu_throughput/<date>-<device>.json`` (e.g. ``2026-12-06-h200.json``), never edited.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clbd.experiment.export import replace_block  # noqa: E402

GOAL_EPOCH_S = 1.5
GOAL_EVAL_SHARE = 0.1
GOAL_CLIP_MFU = 0.35
EVAL_EVERY = 5  # epochs between two evaluations in configs/experiment/na_cifar10_gpu.yaml: the share's denominator
BLOCK = "gpu_throughput"


def load_calls(folder: Path) -> list[dict[str, Any]]:
    """Every call's JSON in ``folder``, oldest name first, each with ``file`` (its file name) set; a clear error for
    a file that is not a gpu_throughput.json (gpu_throughput.py's --measured reads them the same way)."""
    if not folder.is_dir():
        raise SystemExit(f"{folder} is not a folder")
    calls = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise SystemExit(f"{path} is not JSON ({error})") from None
        if "results" not in data:
            raise SystemExit(f"{path} has no 'results' (not a gpu_throughput.json?)")
        calls.append({**data, "file": path.name})
    return calls


def call_name(call: dict[str, Any]) -> str:
    return Path(call["file"]).stem


def device(call: dict[str, Any]) -> str:
    name = str(call.get("machine", {}).get("gpu") or call.get("device"))
    return f"{name} (--quick: tiny models, batch 32)" if call.get("quick") else name


def mfu(result: dict[str, Any]) -> str:
    return f"{statistics.median(result['mfu']):.1%}" if result.get("mfu") else "n/a"


def number(value: Any, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def rows(calls: list[dict[str, Any]], model: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(call, result) for every result of ``model`` (results written before the field existed: SimCLR's carry a
    setting, CLIP's do not)."""
    found = []
    for call in calls:
        for result in call["results"]:
            kind = result.get("model") or ("simclr" if result.get("setting") else "clip")
            if kind == model:
                found.append((call, result))
    return found


def simclr_table(calls: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| setting | call | device | views/s | x eager (same call) | MFU | epoch s (step) | epoch s (+ device views) "
        "| evaluation s (est.) | peak memory GiB | compile + start s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for call, r in rows(calls, "simclr"):
        if "error" in r:
            lines.append(f"| {r['setting']} | {call_name(call)} | {device(call)} | failed: {r['error'][:80]} |||||||||")
            continue
        lines.append(
            f"| {r['setting']} | {call_name(call)} | {device(call)} | {r['images_per_s_median']:,.0f} | "
            f"{number(r.get('ratio_vs_eager'))} | {mfu(r)} | {number(r.get('epoch_s_median'))} | "
            f"{number(r.get('epoch_s_with_device_views'))} | {number(r.get('eval_s_estimate'))} | "
            f"{number(r.get('peak_memory_gib'), 1)} | {max(r.get('fit_overhead_s') or [0]):.0f} |"
        )
    return lines


def clip_table(calls: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| setting | call | device | batch | images/s | x eager (same call) | MFU | peak memory GiB | compile + start s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for call, r in rows(calls, "clip"):
        setting = r.get("setting", "eager")
        if "error" in r:
            lines.append(f"| {setting} | {call_name(call)} | {device(call)} | failed: {r['error'][:80]} |||||||")
            continue
        lines.append(
            f"| {setting} | {call_name(call)} | {device(call)} | {r.get('batch', r['images_per_step'])} | "
            f"{r['images_per_s_median']:,.0f} | {number(r.get('ratio_vs_eager', 1.0 if setting == 'eager' else None))} "
            f"| {mfu(r)} | {number(r.get('peak_memory_gib'), 1)} | {max(r.get('fit_overhead_s') or [0]):.0f} |"
        )
    return lines


def pair_table(calls: list[dict[str, Any]]) -> list[str]:
    lines = []
    for call in calls:
        pair = call.get("two_at_once") or {}
        if pair.get("ratio") and not pair.get("measured_in"):  # a copy of an earlier call's is not a measurement
            lines.append(
                f"| {call_name(call)} | {device(call)} | {pair['setting']} | {pair['steps']} | "
                f"{pair['alone_views_per_s']:,.0f} | {pair['pair_views_per_s']:,.0f} | {pair['ratio']:.2f} | "
                f"{pair['slowdown']:.2f} |"
            )
    if not lines:
        return []
    header = [
        "| call | device | setting | steps each | one alone views/s | two at once views/s (sum) | x one alone | "
        "slowdown of an arm |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return header + lines


def arm_epochs(folder: Path | None) -> list[dict[str, Any]]:
    """The model arms' measured epochs and evaluations (``provenance.json`` under ``folder``), GPU ones only."""
    if folder is None or not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("provenance.json")):
        record = json.loads(path.read_text())
        training_only = "training only" in str(record.get("epoch_s_source"))  # not start-up and monitors too
        if record.get("epoch_s") and training_only and "cpu" not in str(record.get("device", "cpu")):
            found.append({"arm": record.get("arm", path.parent.name), **record})
    return found


def share(evaluation: float, epoch: float) -> str:
    return f"{evaluation / (EVAL_EVERY * epoch):.0%}"


def verdict(calls: list[dict[str, Any]], arms: list[dict[str, Any]]) -> list[str]:
    simclr = [r for _, r in rows(calls, "simclr") if "error" not in r]
    clip = [r for _, r in rows(calls, "clip") if "error" not in r and r.get("mfu")]
    lines = []
    if simclr:
        best = min(simclr, key=lambda r: r.get("epoch_s_with_device_views") or r["epoch_s_median"])
        epoch = best.get("epoch_s_with_device_views") or best["epoch_s_median"]
        evaluation = best.get("eval_s_estimate")
        lines.append(
            f"- SimCLR, the step at its fastest setting (`{best['setting']}`, views made on the device, data ready): "
            f"**{epoch:.2f} s per CIFAR-10 epoch** against the goal's {GOAL_EPOCH_S} s "
            f"({'met' if epoch <= GOAL_EPOCH_S else 'not met'} by the step alone)"
            + (
                f"; one evaluation ~{evaluation:.2f} s (estimate), {share(evaluation, epoch)} of the training between "
                f"two evaluations {EVAL_EVERY} epochs apart"
                if evaluation
                else ""
            )
            + "."
        )
    if arms:
        epoch = statistics.median(a["epoch_s"] for a in arms)
        each = ", ".join(f"{a['arm']} {a['epoch_s']:.2f} s" for a in arms[:6])
        validations = [a["validation_s"] for a in arms if a.get("validation_s")]
        evaluation = statistics.median(validations) if validations else None
        lines.append(
            f"- The experiment arms' real epochs (loaders, device views, their speed arguments): median "
            f"**{epoch:.2f} s** over {len(arms)} arm(s) ({each}): the goal of {GOAL_EPOCH_S} s "
            f"{'met' if epoch <= GOAL_EPOCH_S else 'not met'}"
            + (
                f"; an evaluation {evaluation:.2f} s, **{share(evaluation, epoch)}** of the training between two "
                f"({'under' if evaluation < GOAL_EVAL_SHARE * EVAL_EVERY * epoch else 'not under'} a tenth)"
                if evaluation
                else ""
            )
            + "."
        )
    if clip:
        best = max(clip, key=lambda r: statistics.median(r["mfu"]))
        value = statistics.median(best["mfu"])
        lines.append(
            f"- CLIP at its best setting (`{best.get('setting', 'eager')}`, batch {best.get('batch')}): MFU "
            f"**{value:.1%}** against the goal's {GOAL_CLIP_MFU:.0%} ({'met' if value >= GOAL_CLIP_MFU else 'not met'})."
        )
    return lines


def table(calls: list[dict[str, Any]], arms: list[dict[str, Any]]) -> str:
    if not calls:
        return "No GPU call has measured the speed settings yet (results/gpu_throughput/ is empty)."
    names = ", ".join(f"{call_name(c)} ({device(c)}, {c.get('precision')})" for c in calls)
    parts = [f"From {len(calls)} call(s): {names}. Each ratio is against eager in the same call.", ""]
    parts += ["SimCLR ResNet-18 (CIFAR stem, batch 512, ready batches on the device):", "", *simclr_table(calls), ""]
    parts += ["CLIP ViT-B-32 (224 px, ready batches on the device):", "", *clip_table(calls), ""]
    pairs = pair_table(calls)
    if pairs:
        parts += ["Two SimCLR trainings at once on one GPU against one alone:", "", *pairs, ""]
    parts += ["Verdict:", "", *(verdict(calls, arms) or ["- nothing measured yet."])]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="results/gpu_throughput: one JSON per GPU call")
    parser.add_argument("--arms", type=Path, default=None, help="exported experiment arms (their real epochs)")
    parser.add_argument("--docs", type=Path, default=None, help=f"put the table in FILE's block '{BLOCK}'")
    args = parser.parse_args(argv)
    text = table(load_calls(args.folder), arm_epochs(args.arms))
    if args.docs is not None:
        replace_block(args.docs, BLOCK, text)
        print(f"table written into {args.docs}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
