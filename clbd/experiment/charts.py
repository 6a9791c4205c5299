"""The experiment's pictures: bars of every row; for a budget ladder, attributable ASR, CA and target-class accuracy
against budget (one line per defense, the control drawn the same way, 95% bands over seeds); the CA /
attributable-ASR trade-off with the front of best trade-offs. Suppression (the target class erased) is marked in
each; a defense keeps its colour in both pictures, and no defense is drawn in red, the suppression mark's colour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .table import LABELS, SUPPRESSION_DROP

# matplotlib's tab10 without red (the suppression mark) and grey (the front of best trade-offs), then tab20's light
# shades; the same colour for a defense in every picture (defense_colours).
PALETTE = tuple(f"C{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)) + (
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
)


SEED_DEFENSES = ("cleanclip", "tacleaner", "mcldef", "ubt")  # the same colour in every plan's pictures


def defense_colours(table: dict[str, Any], control: str) -> dict[str, str]:
    """Defense -> colour: the control black, the seed defenses their own, the others (variants) the next free ones in
    the table's order."""
    names = list(dict.fromkeys(row["defense"] for row in table["rows"] if row["role"] == "defense"))
    colours = {control: "black", **{name: PALETTE[i] for i, name in enumerate(SEED_DEFENSES)}}
    free = iter(PALETTE[len(SEED_DEFENSES) :] * (1 + len(names) // len(PALETTE)))
    return {name: colours[name] if name in colours else next(free) for name in [control, *names]}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def percent(stat: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    if stat["mean"] is None:
        return None, None, None
    low = stat["low"] if stat["low"] is not None else stat["mean"]
    high = stat["high"] if stat["high"] is not None else stat["mean"]
    return 100 * stat["mean"], 100 * low, 100 * high


def bar_chart(table: dict[str, Any], path: Path, title: str) -> None:
    plt = pyplot()
    rows = [row for row in table["rows"] if row["per_seed"]]
    shown = ("ca", "asr", "control_asr", "attributable_asr", "clean_to_target")
    colours = ("#3182bd", "#fcae91", "#bdbdbd", "#de2d26", "#756bb1")
    fig, ax = plt.subplots(figsize=(1.9 * max(len(rows), 1) + 2, 4.2))
    width = 0.8 / len(shown)
    for i, (name, colour) in enumerate(zip(shown, colours)):
        stats = [row["summary"][name] for row in rows]
        means = [100 * (s["mean"] or 0) for s in stats]
        errors = [100 * (s["high"] - s["mean"]) if s["low"] is not None else 0 for s in stats]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=LABELS[name], color=colour)
    ax.axhline(0, color="black", linewidth=0.6)
    names = [row["name"] + ("\n(suppression)" if row.get("suppression") else "") for row in rows]
    ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=20 if len(rows) > 6 else 0)
    ax.set_ylabel("% (mean, 95% interval over seeds)")
    ax.set_ylim(min(-10, ax.get_ylim()[0]), 100)
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def defense_lines(table: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Defense -> its rows along the ladder, in budget order (rows with no seed yet left out)."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in table["rows"]:
        if row["role"] == "defense" and row.get("budget_index") is not None and row["per_seed"]:
            lines.setdefault(row["defense"], []).append(row)
    return {name: sorted(rows, key=lambda r: r["budget_index"]) for name, rows in lines.items()}


def budget_curves(table: dict[str, Any], path: Path, title: str, control: str = "finetune") -> bool:
    """Attributable ASR, CA and target-class accuracy against budget; False (nothing drawn) without a ladder."""
    lines = defense_lines(table)
    labels = [f"{i + 1}: {label}" for i, label in enumerate(table.get("budget_labels") or [])]
    if not lines or len(labels) < 2:
        return False
    plt = pyplot()
    colours = defense_colours(table, control)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharex=True)
    clean = next((row for row in table["rows"] if row["role"] == "clean" and row["per_seed"]), None)
    for ax, metric in zip(axes, ("attributable_asr", "ca", "target_accuracy")):
        for name, rows in lines.items():
            xs = [row["budget_index"] for row in rows]
            values = [percent(row["summary"][metric]) for row in rows]
            if any(v[0] is None for v in values):
                continue
            style = {"linestyle": "--"} if name == control else {}
            label = name + (" (control)" if name == control else "")
            ax.plot(xs, [v[0] for v in values], marker="o", label=label, color=colours[name], **style)
            ax.fill_between(xs, [v[1] for v in values], [v[2] for v in values], alpha=0.15, color=colours[name])
            for x, row, value in zip(xs, rows, values):
                if row.get("suppression"):
                    ax.scatter([x], [value[0]], s=140, facecolors="none", edgecolors="red", linewidths=1.5, zorder=5)
        reference = clean["summary"][metric]["mean"] if clean is not None else None
        if reference is not None and metric in ("ca", "target_accuracy"):
            ax.axhline(100 * reference, color="green", linewidth=0.8, label="clean reference")
        if reference is not None and metric == "target_accuracy":
            ax.axhline(
                100 * (reference - SUPPRESSION_DROP),
                color="red",
                linewidth=0.8,
                linestyle=":",
                label="suppression below",
            )
        if metric == "attributable_asr":
            ax.axhline(5, color="grey", linewidth=0.6, linestyle=":", label="removed (5%)")
        ax.set_ylabel(f"{LABELS[metric]} % (mean, 95% band)")
        ax.set_xticks(range(len(labels)), [str(i + 1) for i in range(len(labels))])
        ax.set_xlabel("budget (see below)")
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"{title}  — red ring: suppression (target class erased)\nbudgets: {'; '.join(labels)}", fontsize=9)
    rows_of_legend = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.01 + 0.05 * rows_of_legend, 1, 0.93))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (attributable ASR, CA) not beaten by another with lower-or-equal ASR and higher-or-equal CA."""
    front = [p for p in points if not any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in points)]
    return sorted(set(front))


def tradeoff(table: dict[str, Any], path: Path, title: str, control: str = "finetune") -> bool:
    """CA against attributable ASR: every defense row, the control's, the poisoned and clean models; the front of
    best trade-offs drawn. False (nothing drawn) without defense rows."""
    rows = [row for row in table["rows"] if row["per_seed"]]
    defended = [row for row in rows if row["role"] == "defense"]
    if not defended:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colours = defense_colours(table, control)
    points = []
    for row in rows:
        asr, ca = row["summary"]["attributable_asr"]["mean"], row["summary"]["ca"]["mean"]
        if asr is None or ca is None:
            continue
        x, y = 100 * asr, 100 * ca
        if row["role"] == "defense" and not row.get("suppression"):
            points.append((x, y))
        if row["role"] == "defense":
            key = row["defense"]
            colour = colours[key]
            marker = "s" if key == control else "o"
            ax.scatter(
                [x],
                [y],
                color=colour,
                marker=marker,
                label=key if key not in ax.get_legend_handles_labels()[1] else None,
            )
            if row.get("suppression"):
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors="red", linewidths=1.5)
            if row.get("budget_index") is not None:
                ax.annotate(str(row["budget_index"] + 1), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        else:
            ax.scatter([x], [y], color="black", marker="*" if row["role"] == "clean" else "X", s=90)
            ax.annotate(row["name"], (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    front = pareto_front(points)
    ax.plot(
        [p[0] for p in front],
        [p[1] for p in front],
        color="grey",
        linestyle=":",
        label="front of best trade-offs (defenses without suppression)",
    )
    ax.set_xlabel("attributable ASR % (mean over seeds; lower is better)")
    ax.set_ylabel("CA % (mean over seeds; higher is better)")
    ax.set_title(title + "\nnumber: budget of the ladder; red ring: suppression", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
