"""``clbd experiment``: attack x defense on one poisoned model, as a table (JSON + Markdown) and a bar chart (PNG).

An experiment file names the configs of each step; every step is an ordinary ``clbd fit`` / ``clbd test`` in its
own run directory under ``--out`` (printed as it runs, so any step can be rerun by hand)::

    pretrain:                       # the poisoned model (skipped when `checkpoint` names an existing one)
      configs: [configs/smoke/clip_shapes.yaml, configs/attack/badnet_shapes.yaml]
      overrides: ["--trainer.max_epochs=30"]
      checkpoint: null
    clean_reference: true           # also pretrain without the attack and measure it with the same trigger
    defenses:                       # name -> the defense's configs (the attack config is added by the runner)
      cleanclip: {configs: [configs/defense/cleanclip.yaml], overrides: [...]}

The attack config(s) of ``pretrain`` are every config there after the first; each defense gets them too, so ASR is
always measured with the poisoned run's trigger.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from defenses.base import DEFENSE_METRICS


def run_clbd(argv: list[str]) -> None:
    from .runner import run as main

    print("\n$ clbd " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"clbd experiment: the step above failed (exit {code})")


def flatten(items: list[Any]) -> list[str]:
    """Overrides may nest lists (YAML anchors of shared options): one flat argv."""
    return [str(leaf) for item in items for leaf in (flatten(item) if isinstance(item, list) else [item])]


def load_plan(path: Path) -> dict[str, Any]:
    try:
        plan = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such experiment file: {path}") from None
    if not isinstance(plan, dict) or "pretrain" not in plan or "defenses" not in plan:
        raise ValueError(f"{path}: an experiment needs 'pretrain' and 'defenses' sections")
    configs = plan["pretrain"].get("configs") or []
    if len(configs) < 2:
        raise ValueError(f"{path}: pretrain.configs needs the pretraining config and at least one attack config")
    for config in [*configs, *(c for d in plan["defenses"].values() for c in d.get("configs", []))]:
        if not Path(config).is_file():
            raise FileNotFoundError(f"{path}: config file not found: {config}")
    return plan


def summarise(results: dict[str, Any]) -> dict[str, float | None]:
    """The headline numbers of an evaluation, whichever module wrote it (CLIP zero-shot or SimCLR probe)."""
    if results.get("method") == "simclr":
        probe = results["linear_probe"]
        return {"ca": probe["accuracy"], "asr": probe.get("asr"), "asr_images": probe.get("asr_images")}
    return {
        "ca": results["clean_accuracy_top1"],
        "asr": results.get("asr_top1"),
        "asr_images": results.get("asr_images"),
    }


def markdown(rows: list[dict[str, Any]], definition: str, reference: dict[str, Any] | None = None) -> str:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    def minutes(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    def delta(after: float | None, before: float | None) -> str:
        return "n/a" if after is None or before is None else f"{100 * (after - before):+.1f}"

    lines = [
        "| model | CA before | CA after | ASR before | ASR after | ΔCA | ΔASR | ASR images | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b, a = row["before"], row["after"]
        lines.append(
            f"| {row['name']} | {pct(b['ca'])} | {pct(a['ca'])} | {pct(b['asr'])} | {pct(a['asr'])} | "
            f"{delta(a['ca'], b['ca'])} | {delta(a['asr'], b['asr'])} | {a['asr_images']} | {minutes(row['minutes'])} |"
        )
    text = "\n".join(lines) + f"\n\nCA and ASR in %. ASR: {definition}.\n"
    if reference:
        text += (
            f"\nReference, the same pretraining without poisoning, measured with the same trigger: CA {pct(reference['ca'])},"
            f" ASR {pct(reference['asr'])} (how often a triggered image is called the target with no backdoor).\n"
        )
    return text


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str, reference: dict[str, Any] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    series = [
        ("CA before", [row["before"]["ca"] for row in rows], "#9ecae1"),
        ("CA after", [row["after"]["ca"] for row in rows], "#3182bd"),
        ("ASR before", [row["before"]["asr"] for row in rows], "#fcae91"),
        ("ASR after", [row["after"]["asr"] for row in rows], "#de2d26"),
    ]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    width = 0.2
    for i, (label, values, colour) in enumerate(series):
        xs = [j + (i - 1.5) * width for j in range(len(rows))]
        ax.bar(xs, [100 * (v or 0) for v in values], width, label=label, color=colour)
    if reference and reference.get("asr") is not None:
        ax.axhline(100 * reference["asr"], color="#de2d26", linestyle="--", linewidth=1, label="ASR, clean model")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def clean_reference(plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """Pretrain without the attack, then evaluate with it: the ASR a model without a backdoor already has."""
    pretrain = plan["pretrain"]
    base = ["--config", pretrain["configs"][0], *flatten(pretrain.get("overrides", []))]
    attack = [item for c in pretrain["configs"][1:] for item in ("--config", c)]
    run_dir = out / "clean"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    metrics = run_dir / "checkpoints" / "metrics.json"
    if not checkpoint.exists():
        run_clbd(["fit", *base, f"--trainer.default_root_dir={run_dir}"])
    if not metrics.exists():
        run_clbd(["test", *base, *attack, f"--trainer.default_root_dir={run_dir}", f"--ckpt_path={checkpoint}"])
    results = json.loads(metrics.read_text())[checkpoint.name]
    return {**summarise(results), "checkpoint": str(checkpoint)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clbd experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="experiment file (configs/experiment/*.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder for every run of the experiment")
    parser.add_argument("--only", nargs="*", help="run only these defenses")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"clbd experiment: error: {exc}", file=sys.stderr)
        return 2
    out = args.out
    pretrain = plan["pretrain"]
    configs = [item for c in pretrain["configs"] for item in ("--config", c)]
    attack = [item for c in pretrain["configs"][1:] for item in ("--config", c)]
    poisoned_dir = out / "poisoned"
    checkpoint = pretrain.get("checkpoint") or str(poisoned_dir / "checkpoints" / "last.ckpt")
    started = time.time()
    if not Path(checkpoint).exists():
        run_clbd(
            ["fit", *configs, *flatten(pretrain.get("overrides", [])), f"--trainer.default_root_dir={poisoned_dir}"]
        )
    pretrain_minutes = (time.time() - started) / 60
    reference = clean_reference(plan, out) if plan.get("clean_reference") else None
    earlier = out / "table.json"  # a rerun keeps the minutes of the defenses it does not run again
    earlier_minutes = (
        {row["name"]: row["minutes"] for row in json.loads(earlier.read_text())["rows"]} if earlier.exists() else {}
    )
    rows = []
    for name, defense in plan["defenses"].items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name
        started = time.time()
        reused = (run_dir / DEFENSE_METRICS).exists()
        if not reused:  # a finished defense is kept: rerunning resumes the table
            defense_configs = [item for c in defense["configs"] for item in ("--config", c)]
            run_clbd(
                [
                    "fit",
                    *defense_configs,
                    *attack,
                    *flatten(defense.get("overrides", [])),
                    f"--model.init_args.checkpoint={checkpoint}",
                    f"--trainer.default_root_dir={run_dir}",
                ]
            )
        report = json.loads((run_dir / DEFENSE_METRICS).read_text())
        rows.append(
            {
                "name": name,
                "before": summarise(report["before"]),
                "after": summarise(report["after"]),
                "minutes": earlier_minutes.get(name) if reused else (time.time() - started) / 60,
                "report": str(run_dir / DEFENSE_METRICS),
                "extra": report.get("extra", {}),
            }
        )
    if not rows:
        print("clbd experiment: error: no defense ran (check --only)", file=sys.stderr)
        return 2
    first = json.loads((out / rows[0]["name"] / DEFENSE_METRICS).read_text())
    definition = first["after"].get("asr_definition", "see metrics")
    table = {
        "experiment": str(args.config),
        "poisoned_checkpoint": checkpoint,
        "pretrain_minutes": pretrain_minutes,
        "clean_reference": reference,
        "asr_definition": definition,
        "rows": rows,
    }
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(rows, definition, reference)
    (out / "table.md").write_text(text)
    bar_chart(rows, out / "table.png", f"{args.config.stem}: CA and ASR before / after each defense", reference)
    print("\n" + text)
    print(f"Written: {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'}")
    return 0
