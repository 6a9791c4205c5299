"""The table of an experiment, assembled from finished arms wherever they ran (``--out``, exported result folders):
one row per model over seeds (mean and 95% interval), what each row's seeds ran on, suppression marked, and for a
budget ladder the smallest budget at which each defense removes the backdoor."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from defenses.base import DEFENSE_METRICS

from .arms import FINISHED, Arm
from .plan import budgets
from .runs import PROVENANCE, is_done, same_commands_or_error

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30, the normal's 1.96.
T_975 = tuple(
    float(t)
    for t in "12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131 "
    "2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042".split()
)
INTERVAL = "mean over seeds ± t(0.975, n-1) · s / sqrt(n) (Student's t, s the sample standard deviation)"

# The numbers of a row, in table order; the definitions are lightning_modules.metrics.BACKDOOR_DEFINITIONS.
METRICS = ("ca", "asr", "control_asr", "attributable_asr", "clean_to_target", "flip_rate", "target_accuracy")
LABELS = {
    "ca": "CA",
    "asr": "ASR",
    "control_asr": "control ASR",
    "attributable_asr": "attributable ASR",
    "clean_to_target": "clean→target",
    "flip_rate": "flip rate",
    "target_accuracy": "target-class acc.",
}
SUPPRESSION_DROP = 0.10  # target-class accuracy this far below the clean reference's: the class is suppressed
REMOVED = 0.05  # attributable ASR at or below this: the backdoor counts as removed
GOAL = {"control_at_least": 0.50, "ca_drop_at_most": 0.02, "target_drop_at_most": 0.10}
MISSED = {  # what a failed check of the goal means, as the table says it
    "control_still_backdoored": "the control is below 50% there too",
    "ca_kept": "CA more than 2 points below the clean reference's",
    "target_kept": "target-class accuracy more than 10 points below the clean reference's",
}


# ---- finding finished arms ----------------------------------------------------------------------------------------
def collect(arms: list[Arm], out: Path, sources: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """Each arm's results folder: its run here, else ``SOURCE/<arm id>`` of the first exported folder that has it
    finished. An arm whose record names another command than the plan's is refused (the error names it)."""
    found, missing = {}, []
    for arm in arms:
        candidates = [(arm.run_dir, False)] + [(source / arm.id, True) for source in sources]
        for folder, exported in candidates:
            if is_done(arm, folder):
                same_commands_or_error(arm, folder, out, exported=exported)
                found[arm.id] = folder
                break
        else:
            if arm.kind != "base":  # the base model makes no row
                missing.append(arm.id)
    return found, missing


# ---- numbers --------------------------------------------------------------------------------------------------------
def summarise(results: dict[str, Any]) -> dict[str, float | int | None]:
    """The numbers of one evaluation, whichever evaluator wrote it: an image-SSL method's linear probe (its results
    have ``linear_probe``) or CLIP's zero-shot classifier."""
    if "linear_probe" in results:
        evaluation = results["linear_probe"]
        ca, backdoor = evaluation["accuracy"], evaluation.get("backdoor")
    else:
        ca, backdoor = results["clean_accuracy_top1"], results.get("backdoor")
    out: dict[str, float | int | None] = {"ca": ca}
    for name in METRICS[1:]:
        out[name] = (backdoor or {}).get(name, {}).get("value")
    out["asr_images"] = (backdoor or {}).get("asr", {}).get("images")
    return out


def interval(values: list[float | None]) -> dict[str, Any]:
    """Mean and 95% t-interval over seeds (no interval from one value; None values are left out)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = statistics.fmean(known)
    if len(known) < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    t = T_975[len(known) - 2] if len(known) - 1 <= len(T_975) else 1.96
    half = t * statistics.stdev(known) / math.sqrt(len(known))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(known)}


def aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: interval([values.get(name) for values in per_seed.values()]) for name in METRICS}


def arm_result(arm: Arm, folder: Path, file: str) -> dict[str, Any]:
    """One row's numbers from one arm's folder, with its budget as run, its device and its minutes."""
    report = json.loads((folder / file).read_text())
    entry: dict[str, Any] = {"result": summarise(report["after"] if file == DEFENSE_METRICS else report)}
    provenance = json.loads((folder / PROVENANCE).read_text()) if (folder / PROVENANCE).exists() else {}
    entry["device"] = provenance.get("device")
    wall = provenance.get("wall_s") or {}
    entry["minutes"] = sum(wall.values()) / 60 if wall else None
    if arm.kind == "defense":
        finished = folder / FINISHED
        steps = json.loads(finished.read_text()).get("global_step") if finished.exists() else None
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
        batch = (((config or {}).get("data") or {}).get("init_args") or {}).get("batch_size")
        entry["steps"], entry["samples"] = steps, steps * batch if steps is not None and batch else None
    return entry


def build_table(plan: dict[str, Any], config: Path, arms: list[Arm], found: dict[str, Path], missing: list[str]):
    from lightning_modules.metrics import BACKDOOR_DEFINITIONS

    rows: dict[str, dict[str, Any]] = {}
    for arm in arms:
        for file, name in arm.rows.items():
            row = rows.setdefault(
                name,
                {
                    "name": name,
                    "role": arm.role,
                    "group": arm.group,
                    "defense": arm.defense,
                    "per_seed": {},
                    "seeds": [],
                },
            )
            if arm.budget is not None and arm.budget.suffix:
                row["budget_label"], row["budget_index"] = arm.budget.label(), arm_budget_index(plan, arm)
            folder = found.get(arm.id)
            if folder is None or not (folder / file).exists():
                continue
            entry = arm_result(arm, folder, file)
            row["per_seed"][str(arm.seed)] = entry
            row["seeds"].append(arm.seed)
    table_rows = []
    for row in rows.values():
        entries = row.pop("per_seed")
        row["per_seed"] = {seed: e["result"] for seed, e in entries.items()}
        row["summary"] = aggregate(row["per_seed"])
        row["minutes"] = {seed: e["minutes"] for seed, e in entries.items()}
        row["devices"] = sorted({e["device"] for e in entries.values() if e.get("device")})
        steps = sorted({e["steps"] for e in entries.values() if e.get("steps") is not None})
        samples = sorted({e["samples"] for e in entries.values() if e.get("samples") is not None})
        if steps:
            row["steps"], row["samples"] = steps, samples
            row["budget"] = f"{'/'.join(map(str, steps))} steps, {'/'.join(map(str, samples))} samples"
        table_rows.append(row)
    mark_suppression(table_rows)
    table = {
        "experiment": str(config),
        "seeds": plan["seeds"],
        "interval": INTERVAL,
        "definitions": {
            "CA": "clean top-1 accuracy (linear probe for image SSL, zero-shot for CLIP)",
            **{k: v for k, v in BACKDOOR_DEFINITIONS.items() if k != "histograms"},
            "suppression": f"a defense whose target-class accuracy is more than {100 * SUPPRESSION_DROP:.0f} points "
            "below the clean reference's: its cut in ASR comes with the target class erased",
        },
        "budget_note": budget_note(plan),
        "defense_budget": plan.get("defense_budget"),
        "defense_budgets": plan.get("defense_budgets"),
        "budget_labels": [b.label() for b in budgets(plan)] if plan.get("defense_budgets") else [],
        "rows": table_rows,
        "missing": missing,
    }
    if plan.get("defense_budgets"):
        table["smallest_budgets"] = smallest_budgets(plan, table_rows)
    return table


def arm_budget_index(plan: dict[str, Any], arm: Arm) -> int:
    return [b.suffix for b in budgets(plan)].index(arm.budget.suffix)


def mean(row: dict[str, Any] | None, name: str) -> float | None:
    return None if row is None else row["summary"][name]["mean"]


def mark_suppression(rows: list[dict[str, Any]]) -> None:
    by_name = {row["name"]: row for row in rows}
    for row in rows:
        reference = mean(by_name.get(row["group"]), "target_accuracy") if row["group"] else None
        mine = mean(row, "target_accuracy")
        row["target_drop"] = None if reference is None or mine is None else reference - mine
        row["suppression"] = (
            row["role"] == "defense" and row["target_drop"] is not None and (row["target_drop"] > SUPPRESSION_DROP)
        )


def smallest_budgets(plan: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per defense, the first budget of the ladder (the plan's order: smallest first) whose mean attributable ASR is
    at most 5%, with its CA, target-class accuracy and the control's attributable ASR at that budget, and whether
    it meets the goal (control still >= 50%, CA at most 2 and target-class accuracy at most 10 points below the
    clean reference's)."""
    control = plan.get("control", "finetune")
    by_key = {(row["defense"], row.get("budget_index")): row for row in rows if row["role"] == "defense"}
    clean = next((row for row in rows if row["role"] == "clean"), None)
    out: dict[str, Any] = {}
    for defense in dict.fromkeys(row["defense"] for row in rows if row["role"] == "defense"):
        ladder = sorted((k[1], r) for k, r in by_key.items() if k[0] == defense)
        first = next(((i, r) for i, r in ladder if removed(mean(r, "attributable_asr"))), None)
        if first is None:
            out[defense] = {
                "budget": None,
                "best_attributable_asr": min(
                    (mean(r, "attributable_asr") for _, r in ladder if mean(r, "attributable_asr") is not None),
                    default=None,
                ),
            }
            continue
        index, row = first
        control_row = by_key.get((control, index))
        entry = {
            "budget": row["budget_label"],
            "attributable_asr": mean(row, "attributable_asr"),
            "ca": mean(row, "ca"),
            "target_accuracy": mean(row, "target_accuracy"),
            "control_attributable_asr": mean(control_row, "attributable_asr"),
            "seeds": len(row["per_seed"]),
        }
        if defense != control and clean is not None:
            checks = {
                "control_still_backdoored": (entry["control_attributable_asr"] or 0) >= GOAL["control_at_least"],
                "ca_kept": entry["ca"] >= mean(clean, "ca") - GOAL["ca_drop_at_most"],
                "target_kept": entry["target_accuracy"] >= mean(clean, "target_accuracy") - GOAL["target_drop_at_most"],
            }
            entry["goal"] = {**checks, "met": all(checks.values())}
        out[defense] = entry
    return out


def removed(attributable: float | None) -> bool:
    return attributable is not None and attributable <= REMOVED


def budget_note(plan: dict[str, Any]) -> str | None:
    if "defenses" not in plan or not plan.get("defenses"):
        return None
    ladder = budgets(plan)
    if plan.get("defense_budgets"):
        given = "every defense was run at each budget of the ladder: " + "; ".join(b.label() for b in ladder) + "."
    elif plan.get("defense_budget"):
        budget = ladder[0]
        given = f"every defense was given {budget.label()}" + (
            f" ({budget.samples()} samples)." if budget.samples() else "."
        )
    else:
        given = "no common budget was set (defense_budget): each ran its own config's."
    return (
        "Budget: optimiser steps of each defense's training loop (from its fit_finished.json) and samples seen "
        f"(steps x batch size); {given} Stage-1 work outside that loop (UBT's overfitting steps, MCLDef's trigger "
        "inversion) is in each defense's defense_metrics.json."
    )


# ---- text -------------------------------------------------------------------------------------------------------------
def cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["low"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * (stat['high'] - stat['mean']):.1f}"


def markdown(table: dict[str, Any]) -> str:
    columns = ["CA", "ASR", "control ASR", "**attributable ASR**", "clean→target", "flip rate", "target-class acc."]
    extra = ["budget", "ASR images", "minutes", "seeds", "device"]
    lines = ["| model | " + " | ".join(columns + extra) + " |", "|---" * (len(columns) + len(extra) + 1) + "|"]
    shown = [row for row in table["rows"] if row["per_seed"]]  # rows no arm has reached yet: in "Still missing"
    if not shown:
        lines = [f"No arm of {table['experiment']} has finished yet."]
    for row in shown:
        stats = row["summary"]
        cells = [cell(stats[name]) for name in METRICS]
        cells[3] = f"**{cells[3]}**"
        if row.get("suppression"):
            cells[6] += " (suppression)"
        images = sorted({v.get("asr_images") for v in row["per_seed"].values() if v.get("asr_images") is not None})
        minutes = [m for m in row.get("minutes", {}).values() if m is not None]
        seeds = ",".join(map(str, sorted(row["seeds"]))) or "none yet"
        lines.append(
            f"| {row['name']} | " + " | ".join(cells) + f" | {row.get('budget') or '-'} | "
            f"{'/'.join(map(str, images)) or '-'} | {f'{statistics.fmean(minutes):.1f}' if minutes else '-'} | "
            f"{len(row['seeds'])} ({seeds}) | {', '.join(row.get('devices') or []) or '-'} |"
        )
    seeds = table["seeds"]
    text = "\n".join(lines)
    text += (
        f"\n\nIn %, over the plan's {len(seeds)} seed(s) {seeds} (each row says which it has): {INTERVAL}. "
        "Read **attributable ASR** = ASR − control ASR: the part of the ASR the trigger itself causes; ASR alone "
        "also counts a bias toward the target (clean→target) and what any patch does (control ASR).\n"
    )
    for name, definition in table["definitions"].items():
        text += f"- {name}: {definition}\n"
    if table.get("budget_note"):
        text += f"\n{table['budget_note']}\n"
    if table.get("smallest_budgets"):
        text += "\n" + smallest_budget_text(table["smallest_budgets"])
    if table.get("missing"):
        text += f"\nStill missing ({len(table['missing'])} arms): {', '.join(table['missing'])}.\n"
    return text


def smallest_budget_text(entries: dict[str, Any]) -> str:
    lines = [
        f"Smallest budget at which attributable ASR ≤ {100 * REMOVED:.0f}% (mean over seeds):",
        "",
        "| defense | budget | attributable ASR | CA | target-class acc. | control's attributable ASR there | goal |",
        "|---|---|---|---|---|---|---|",
    ]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    for defense, entry in entries.items():
        if entry["budget"] is None:
            lines.append(f"| {defense} | none on the ladder | best {pct(entry['best_attributable_asr'])} | | | | no |")
            continue
        goal = entry.get("goal")
        verdict = (
            "control"
            if goal is None
            else (
                "met" if goal["met"] else "no: " + ", ".join(MISSED[k] for k, v in goal.items() if k != "met" and not v)
            )
        )
        lines.append(
            f"| {defense} | {entry['budget']} | {pct(entry['attributable_asr'])} | {pct(entry['ca'])} | "
            f"{pct(entry['target_accuracy'])} | {pct(entry['control_attributable_asr'])} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
