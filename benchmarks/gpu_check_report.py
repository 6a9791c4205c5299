"""The summary benchmarks/gpu_check.sh prints last: what each stage left in OUT, as one short table per stage.

Reads only files (any of them may be missing: a stage that failed or ran out of time is reported as such):
``pytest_gpu.xml``, ``gpu_throughput.json``, ``arms/arms.tar`` and ``arms/arms_schedule.json``, ``na_epochs.jsonl``,
``na_metrics.csv`` and the NA run's test ``metrics.json`` (in WORK's run folder, else inside ``na_run.tar.gz``).

Run: ``python benchmarks/gpu_check_report.py OUT [--work WORK]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.arm_bundle import BUNDLE, arm_ids, arms_in, open_arm  # noqa: E402


def pytest_summary(path: Path) -> list[str]:
    if not path.exists():
        return ["pytest -m gpu: no report (stage skipped, failed to start or timed out)"]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [
        f"pytest -m gpu: {counts['tests']} tests, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped"
    ]
    for case in root.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            node = case.find(outcome)
            if node is not None:
                message = (node.get("message") or "").splitlines()[0][:110] if node.get("message") else ""
                lines.append(f"  {outcome}: {case.get('name')}: {message}")
    return lines


def throughput_summary(path: Path) -> list[str]:
    if not path.exists():
        return ["throughput: no results (stage skipped, failed or timed out)"]
    data = json.loads(path.read_text())
    lines = [f"throughput on {data['machine'].get('gpu', data['device'])}, precision {data['precision']}:"]
    for r in data["results"]:
        if "error" in r:
            lines.append(f"  {r['case']}: FAILED {r['error']}")
            continue
        mfu = f"MFU {statistics.median(r['mfu']):.1%}" if r.get("mfu") else "MFU n/a"
        lines.append(
            f"  {r['case']}: {r['images_per_s_median']:.0f} images/s, {r['flops_per_step'] / 1e9:.1f} GFLOP/step, "
            f"{r['achieved_tflops_median']:.1f} TFLOP/s, {mfu}"
        )
        if r.get("knobs", {}).get("compile_mode") and r.get("fit_overhead_s"):
            lines.append(f"    compilation + Trainer start and end: {max(r['fit_overhead_s']):.0f} s")
        if r.get("model") == "clip" and r.get("ratio_vs_eager") is not None:
            lines.append(f"    x{r['ratio_vs_eager']:.2f} CLIP's eager, batch {r.get('batch')}")
        if r.get("peak_memory_gib") is not None:
            lines.append(f"    peak memory {r['peak_memory_gib']:.1f} GiB")
        if r.get("epoch_s_median") is not None:
            ratio = f" (x{r['ratio_vs_eager']:.2f} eager)" if r.get("ratio_vs_eager") is not None else ""
            lines.append(f"    CIFAR-10 epoch (50k images, 2 views) at this rate: {r['epoch_s_median']:.2f} s{ratio}")
        if r.get("eval_s_estimate") is not None:
            lines.append(
                f"    evaluation (80k forward passes + kNN vote) ~{r['eval_s_estimate']:.2f} s: forward "
                f"{r['eval_forward_images_per_s']:.0f} images/s, vote {r['knn_vote_s']:.2f} s"
            )
        profile = r.get("profile")
        if profile:
            shares = ", ".join(f"{kind} {share:.0%}" for kind, share in profile["shares"].items() if share >= 0.01)
            busy = f", busy {profile['busy_share']:.0%}" if profile.get("busy_share") is not None else ""
            lines.append(
                f"    profile ({profile['clock']} time{busy}; {profile['between_steps_ms_per_step']:.2f} ms/step "
                f"between steps): {shares}"
            )
            top = profile["top"][:3]
            lines.append("    top: " + "; ".join(f"{t['name'][:60]} {t['share']:.0%}" for t in top))
        if r.get("device_views_per_s") is not None:
            lines.append(
                f"    views made on the device: {r['device_views_per_s']:.0f} views/s alone; step + views "
                f"{r['images_per_s_with_device_views']:.0f} images/s, an epoch {r['epoch_s_with_device_views']:.2f} s"
            )
        if r.get("device_images_per_s") is not None:
            lines.append(
                f"    CLIP images made on the device: {r['device_images_per_s']:.0f} images/s alone; step + images "
                f"{r['images_per_s_with_device_images']:.0f} images/s"
            )
        decode = r.get("jpeg_decode")
        if decode:
            nvjpeg = (
                f"nvjpeg {decode['nvjpeg_per_s']:.0f} images/s (batches of {decode['nvjpeg_batch']})"
                if "nvjpeg_per_s" in decode
                else f"nvjpeg failed: {decode.get('nvjpeg_error')}"
            )
            faster = f"; faster: {decode['faster']}" if "faster" in decode else ""
            lines.append(
                f"    JPEG decode of {decode['jpegs']} photos: {nvjpeg}, PIL on one core "
                f"{decode['pil_one_core_per_s']:.0f} images/s{faster}"
            )
    fastest = data.get("fastest_simclr_setting")
    if fastest:
        measured = fastest.get("measured_in", "this call")
        run = (
            f", a {fastest['run_epochs']}-epoch run ~{fastest['run_s_estimate']:.0f} s"
            if fastest.get("run_s_estimate")
            else ""
        )
        lines.append(
            f"  fastest SimCLR setting: {fastest['setting']} ({measured}{run}; {' '.join(fastest['fit_args'])})"
        )
    pair = data.get("two_at_once")
    if pair:
        lines.append(f"  two at once ({pair['setting']}, {pair['steps']} steps per process): {two_at_once_text(pair)}")
    return lines


def two_at_once_text(pair: dict[str, Any]) -> str:
    """gpu_throughput.py's "two at once": the pair's views/s over one alone's and an arm's slowdown beside another."""
    if pair.get("ratio") is None:
        return pair.get("skipped") or f"FAILED {pair.get('error')}"
    each = ", ".join(f"x{x:.2f}" for x in pair.get("per_process_slowdown", []))
    return (
        f"one alone {pair.get('alone_views_per_s', float('nan')):.0f} views/s, two together "
        f"{pair.get('pair_views_per_s', float('nan')):.0f} views/s: x{pair['ratio']:.2f} "
        f"({'pays' if pair['ratio'] > 1 else 'does not pay'}); an arm beside another takes x{pair['slowdown']:.2f} as "
        f"long (each process {each or 'n/a'})"
    )


def write_profiles(path: Path, target: Path) -> None:
    """The throughput run's profiles ("where the time goes") as markdown, for docs/benchmarks.md."""
    from benchmarks.step_profile import markdown  # needs torch; the summary itself does not

    if not path.exists():
        raise SystemExit(f"--profile-md: no {path}")
    data = json.loads(path.read_text())
    profiled = [r for r in data["results"] if r.get("profile")]
    header = f"# Where the time goes ({data['machine'].get('gpu', data['device'])}, {data['precision']})\n\n"
    target.write_text(header + "\n".join(markdown(r["case"], r["profile"]) for r in profiled))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _test_metrics(out: Path, work: Path | None) -> dict[str, Any] | None:
    if work is not None:
        found = sorted((work / "runs" / "na_cifar10").glob("checkpoints/metrics.json"))
        if found:
            return json.loads(found[0].read_text())
    archive = out / "na_run.tar.gz"
    if archive.exists():
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.endswith("checkpoints/metrics.json"):
                    return json.loads(tar.extractfile(member).read())
    return None


def na_summary(out: Path, work: Path | None) -> list[str]:
    epochs = read_jsonl(out / "na_epochs.jsonl")
    if not epochs:
        return ["NA run: no finished epoch (stage skipped, failed or timed out)"]
    train = [e["train_s"] for e in epochs]
    steady = train[1:] or train  # the first epoch carries start-up (workers, cudnn autotuning, compilation)
    lines = [
        f"NA run: {len(epochs)} epochs; train epoch median {statistics.median(steady):.2f} s "
        f"(first {train[0]:.2f} s), {statistics.median([e['train_images_per_s'] or 0 for e in epochs]):.0f} "
        f"images/s (2 views each)",
        f"  {'epoch':>5} {'train s':>8} {'val s':>6} {'loss':>7}  val metrics",
    ]
    for e in epochs:
        metrics = " ".join(f"{k[4:]}={v:.4f}" for k, v in sorted(e.items()) if k.startswith("val/"))
        loss = e.get("train/loss_epoch", e.get("train/loss"))
        loss_text = f"{loss:7.3f}" if isinstance(loss, (int, float)) else f"{'':>7}"
        lines.append(f"  {e['epoch']:>5} {e['train_s']:>8.2f} {e['val_s']:>6.2f} {loss_text}  {metrics}")
    results = _test_metrics(out, work)
    if results is None:
        lines.append("clbd test: no metrics.json (stage failed or timed out)")
    else:
        for name, entry in results.items():
            knn, probe = entry.get("knn", {}), entry.get("linear_probe", {})
            lines.append(
                f"clbd test ({name}): kNN acc {knn.get('accuracy')}, kNN ASR {knn.get('asr')}, "
                f"probe acc {probe.get('accuracy')}, probe ASR {probe.get('asr')}"
            )
            extra = {k: v for k, v in knn.items() if "asr" in k and k not in ("asr", "asr_images")}
            if extra:
                lines.append(f"  other kNN ASR measures: {json.dumps(extra)}")
    return lines


def arms_summary(folder: Path) -> list[str]:
    """How many arms ran at once and why (``arms_schedule.json``), then one line per archived experiment arm: its
    id, the device, wall time, the arms it ran beside and its headline numbers."""
    lines, beside = [], {}
    schedule_file = folder / "arms_schedule.json"
    if schedule_file.exists():
        schedule = json.loads(schedule_file.read_text())
        how = "one at a time" if schedule["parallel"] == 1 else f"up to {schedule['parallel']} at once"
        slowdown = f", each estimated x{schedule['slowdown']:.2f} beside another" if schedule["parallel"] > 1 else ""
        lines.append(f"experiment arms: {how}{slowdown} ({schedule.get('why') or 'no reason given'})")
        beside = {entry["id"]: entry["beside"] for entry in schedule["arms"]}
    for member, data in arms_in(folder / BUNDLE):
        with open_arm(data) as tar:
            members = tar.getmembers()
            arm_name = ", ".join(sorted(arm_ids(members))) or member
            files = {Path(m.name).name: m for m in members if m.isfile()}
            provenance = (
                json.loads(tar.extractfile(files["provenance.json"]).read()) if "provenance.json" in files else {}
            )
            result = None
            for name in ("eval.json", "defense_metrics.json"):
                if name in files:
                    result = json.loads(tar.extractfile(files[name]).read())
                    result = result.get("after", result)
            probe = (result or {}).get("linear_probe") or {}
            backdoor = probe.get("backdoor") or (result or {}).get("backdoor") or {}
            numbers = ", ".join(
                f"{key} {100 * backdoor[key]['value']:.1f}%"
                for key in ("asr", "attributable_asr")
                if isinstance(backdoor.get(key), dict) and backdoor[key].get("value") is not None
            )
            wall = sum((provenance.get("wall_s") or {}).values())
            ca = probe.get("accuracy")
            neighbours = beside.get(arm_name)
            lines.append(
                f"arm {arm_name}: {provenance.get('device', '?')}, {wall:.0f} s"
                + (f" (beside {', '.join(neighbours)})" if neighbours else "")
                + (f", CA {100 * ca:.1f}%" if ca is not None else "")
                + (f", {numbers}" if numbers else "")
            )
    return lines if any(line.startswith("arm ") for line in lines) else [*lines, "experiment arms: none archived"]


def metrics_columns(path: Path) -> list[str]:
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return [name for name in (csv.DictReader(file).fieldnames or []) if name.startswith("val/")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument(
        "--profile-md", type=Path, default=None, help="write the throughput JSON's profiles here as markdown"
    )
    args = parser.parse_args(argv)
    if args.profile_md:
        write_profiles(args.out / "gpu_throughput.json", args.profile_md)
    lines = ["==== gpu_check summary ===="]
    lines += pytest_summary(args.out / "pytest_gpu.xml")
    lines += throughput_summary(args.out / "gpu_throughput.json")
    lines += arms_summary(args.out / "arms")
    lines += na_summary(args.out, args.work)
    columns = metrics_columns(args.out / "na_metrics.csv")
    if columns:
        lines.append(f"val/ metrics logged in na_metrics.csv: {', '.join(columns)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
