"""``clbd experiment``: attack x defense, or attack x image-SSL method, over seeds, as a table (JSON + Markdown) and a
bar chart (PNG), every number a mean with a 95% interval.

An experiment file names the configs of each step; every step is an ordinary ``clbd fit`` / ``clbd test`` in its
own run directory under ``--out/seed<S>/`` (printed as it runs, so any step can be rerun by hand). Two kinds:

Defenses (one poisoned model per seed, each defense from it)::

    seeds: [0, 1, 2]                # each seed: poisoned pretraining, clean reference, every defense
    common: [...]                   # overrides for every step (e.g. --trainer.accelerator=cpu)
    base:                           # optional: a clean model trained once (its own seed) into --out/base, or into
      configs: [...]                #   base.dir to share it between experiments; then the poisoned and the clean
      dir: runs/clip-shapes-base    #   run of every seed fine-tune it (model.pretrained)
      then:                         # clbd commands run once after it unless `creates` exists; {base} = its last.ckpt
        - {command: [poison, optimize-trigger, --checkpoint, "{base}", ...], creates: runs/x/trigger.png}
    pretrain:
      configs: [configs/smoke/clip_shapes.yaml, configs/attack/badnet_shapes.yaml]
      overrides: []
    clean_reference: true           # also pretrain without the attack and measure it with the same triggers
    defense_budget: {steps: 200, batch_size: 64}   # the same optimiser steps x batch for every defense
    defenses:                       # name -> the defense's configs (the attack config is added by the runner)
      cleanclip: {configs: [configs/defense/cleanclip.yaml], overrides: [...]}

Image SSL (attack x method, each method with a clean reference)::

    seeds: [0, 1, 2]
    methods: {simclr: {configs: [configs/smoke/simclr_shapes.yaml], overrides: []}}
    attacks: {na: {configs: [configs/smoke/na_shapes.yaml]}, sslbkd: {configs: [...]}}

The seed goes to ``seed_everything`` and ``data.seed`` (initialisation, data order, augmentations); the attack's own
seed (which samples are poisoned, the trigger) stays the config's, so every seed measures the same attack. Runs
that finished (``fit_finished.json``, ``defense_metrics.json``, a saved evaluation) are reused; an interrupted fit
resumes from its ``last.ckpt``; in both cases only for the ``clbd fit`` arguments and config-file contents that
made the run (recorded in its ``experiment_command.json``). On a machine without CUDA, or with
``--trainer.accelerator=cpu``, every step runs in 32-bit (``--trainer.precision=32-true``) unless an override says
otherwise, so no row runs bf16 on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from defenses.base import DEFENSE_METRICS

from .steps import run_step

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
FINISHED = "fit_finished.json"
COMMAND_RECORD = "experiment_command.json"  # the clbd fit arguments a run was made with, to reuse it only for those


def flatten(items: list[Any]) -> list[str]:
    """Overrides may nest lists (YAML anchors of shared options): one flat argv."""
    return [str(leaf) for item in items for leaf in (flatten(item) if isinstance(item, list) else [item])]


def config_args(configs: list[str]) -> list[str]:
    return [item for c in configs for item in ("--config", c)]


def cpu_precision(argv: list[str]) -> list[str]:
    """32-bit on CPU runs (bf16 autocast on a CPU is slow and not what a GPU run computes), unless the argv sets it."""
    import torch

    on_cpu = "--trainer.accelerator=cpu" in argv or not torch.cuda.is_available()
    if on_cpu and not any(a.startswith("--trainer.precision") for a in argv):
        return [*argv, "--trainer.precision=32-true"]
    return argv


# ---- the experiment file ---------------------------------------------------------------------------------------
def load_plan(path: Path) -> dict[str, Any]:
    """The experiment file, checked before any compute; errors name the field."""
    try:
        plan = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config: no such experiment file: {path}") from None
    if not isinstance(plan, dict):
        raise ValueError(f"{path}: an experiment file is a mapping")
    grid = "methods" in plan or "attacks" in plan
    if grid:
        if not plan.get("methods") or not plan.get("attacks"):
            raise ValueError(f"{path}: an image-SSL experiment needs 'methods' and 'attacks' sections")
    elif "pretrain" not in plan or "defenses" not in plan:
        raise ValueError(f"{path}: an experiment needs 'pretrain' and 'defenses' sections (or 'methods' and 'attacks')")
    seeds = plan.setdefault("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: seeds must be a non-empty list of integers (e.g. [0, 1, 2]), got {seeds!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds must be distinct integers, got {seeds!r}")
    if grid:
        for section in ("methods", "attacks"):
            for name, entry in plan[section].items():
                if not (entry or {}).get("configs"):
                    raise ValueError(f"{path}: {section}.{name}.configs is empty")
        configs = [c for s in ("methods", "attacks") for e in plan[s].values() for c in e["configs"]]
    else:
        pretrain = plan["pretrain"]
        if len(pretrain.get("configs") or []) < 2:
            raise ValueError(f"{path}: pretrain.configs needs the pretraining config and at least one attack config")
        if pretrain.get("checkpoint") and len(seeds) > 1:
            raise ValueError(f"{path}: pretrain.checkpoint is one model, but seeds has {len(seeds)}; give one seed")
        base = plan.get("base")
        if base is not None:
            if not isinstance(base, dict) or not base.get("configs"):
                raise ValueError(f"{path}: base.configs is empty (the clean model's pretraining config)")
            if pretrain.get("checkpoint"):
                raise ValueError(f"{path}: give base (a clean model to fine-tune) or pretrain.checkpoint, not both")
            for i, step in enumerate(base.get("then") or []):
                if not isinstance(step, dict) or not step.get("command") or not step.get("creates"):
                    raise ValueError(f"{path}: base.then[{i}] needs a command (clbd arguments) and creates (a path)")
            seed = base.setdefault("seed", 0)
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"{path}: base.seed must be an integer, got {seed!r}")
        budget = plan.get("defense_budget") or {}
        for key in ("steps", "batch_size"):
            if key in budget and (not isinstance(budget[key], int) or budget[key] < 1):
                raise ValueError(f"{path}: defense_budget.{key} must be an integer >= 1, got {budget[key]!r}")
        configs = [
            *(base or {}).get("configs", []),
            *pretrain["configs"],
            *(c for d in plan["defenses"].values() for c in d.get("configs", [])),
        ]
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(f"{path}: config file not found: {config}")
    return plan


def data_settings(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    """The data section's init_args as the CLI would merge them (configs in order, then ``--data.*`` overrides)."""
    merged: dict[str, Any] = {}
    for config in configs:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
        for key, value in (data.get("init_args") or {}).items():
            if key == "attack" and isinstance(value, dict) and isinstance(merged.get("attack"), dict):
                attack = dict(merged["attack"])
                attack["init_args"] = {**(attack.get("init_args") or {}), **(value.get("init_args") or {})}
                attack["class_path"] = value.get("class_path", attack.get("class_path"))
                merged["attack"] = attack
            else:
                merged[key] = value
    for item in overrides:
        for prefix in ("--data.init_args.", "--data."):
            if item.startswith(prefix) and "=" in item:
                key, value = item[len(prefix) :].split("=", 1)
                if "." not in key:
                    merged[key] = yaml.safe_load(value)
                elif key.startswith("attack.") and key.count(".") >= 1:
                    name = key.rsplit(".", 1)[-1]
                    attack = merged.setdefault("attack", {})
                    attack.setdefault("init_args", {})[name] = yaml.safe_load(value)
                break
    return merged


def check_eval_set(where: str, configs: list[str], overrides: list[str]) -> None:
    """Before any compute: the eval set has the attack's target class and images of other classes."""
    from datamodules.builtin import resolve_builtin
    from datamodules.shards import resolve_shards

    data = data_settings(configs, overrides)
    attack = data.get("attack") or {}
    target = (attack.get("init_args") or {}).get("target_class")
    spec = data.get("test_shards") or data.get("val_shards")
    if target is None or not spec:
        return
    index = resolve_shards(resolve_builtin(spec), name="data.test_shards")
    names = data.get("class_names") or index.classes
    if not names:
        raise ValueError(f"{where}: data.test_shards={spec} has no class names; ASR needs a labelled eval set")
    if isinstance(target, int):
        position = target if 0 <= target < len(names) else None
    else:
        position = list(names).index(target) if target in names else None
    if position is None:
        raise ValueError(
            f"{where}: data.attack.init_args.target_class={target!r} is not a class of the eval set "
            f"data.test_shards={spec} ({len(names)} classes: {', '.join(list(names)[:10])})"
        )
    counts = index.class_counts
    if counts and sum(counts) == counts[position]:
        raise ValueError(
            f"{where}: data.test_shards={spec} holds only images of the target class {target!r}; ASR needs others"
        )


# ---- results ---------------------------------------------------------------------------------------------------
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


def cell(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "n/a"
    if stat["low"] is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} ± {100 * (stat['high'] - stat['mean']):.1f}"


def markdown(table: dict[str, Any]) -> str:
    columns = ["CA", "ASR", "control ASR", "**attributable ASR**", "clean→target", "flip rate", "target-class acc."]
    lines = [
        "| model | " + " | ".join(columns) + " | budget | ASR images | minutes |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for row in table["rows"]:
        stats = row["summary"]
        cells = [cell(stats[name]) for name in METRICS]
        cells[3] = f"**{cells[3]}**"
        images = sorted({v.get("asr_images") for v in row["per_seed"].values() if v.get("asr_images") is not None})
        minutes = [m for m in row.get("minutes", {}).values() if m is not None]
        lines.append(
            f"| {row['name']} | " + " | ".join(cells) + f" | {row.get('budget') or '-'} | "
            f"{'/'.join(map(str, images)) or '-'} | {statistics.fmean(minutes) if minutes else 0:.1f} |"
        )
    seeds = table["seeds"]
    text = "\n".join(lines)
    text += (
        f"\n\nIn %, over {len(seeds)} seed(s) {seeds}: {INTERVAL}. Read **attributable ASR** = ASR − control ASR: "
        "the part of the ASR the trigger itself causes; ASR alone also counts a bias toward the target "
        "(clean→target) and what any patch does (control ASR).\n"
    )
    for name, definition in table["definitions"].items():
        text += f"- {name}: {definition}\n"
    if table.get("budget_note"):
        text += f"\n{table['budget_note']}\n"
    return text


def bar_chart(table: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    shown = ("ca", "asr", "control_asr", "attributable_asr", "clean_to_target")
    colours = ("#3182bd", "#fcae91", "#bdbdbd", "#de2d26", "#756bb1")
    fig, ax = plt.subplots(figsize=(1.9 * len(rows) + 2, 4.2))
    width = 0.8 / len(shown)
    for i, (name, colour) in enumerate(zip(shown, colours)):
        stats = [row["summary"][name] for row in rows]
        means = [100 * (s["mean"] or 0) for s in stats]
        errors = [100 * (s["high"] - s["mean"]) if s["low"] is not None else 0 for s in stats]
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=LABELS[name], color=colour)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(rows)), [row["name"] for row in rows], fontsize=8)
    ax.set_ylabel("% (mean, 95% interval over seeds)")
    ax.set_ylim(min(-10, ax.get_ylim()[0]), 100)
    ax.set_title(title, fontsize=9)
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- steps -----------------------------------------------------------------------------------------------------
class Runner:
    """Runs (or reuses) each step of one seed and remembers how long each took."""

    def __init__(self, out: Path, seed: int, common: list[str], earlier: dict[str, Any]):
        self.out, self.seed, self.common = out / f"seed{seed}", seed, common
        self.earlier = earlier  # minutes of steps finished by an earlier call, by run name
        self.minutes: dict[str, float | None] = {}

    def seeded(self, configs: list[str], overrides: list[str]) -> list[str]:
        """configs, then the common overrides, then the step's own, then the seed."""
        seed = [f"--seed_everything={self.seed}", f"--data.init_args.seed={self.seed}"]
        return cpu_precision([*config_args(configs), *self.common, *overrides, *seed])

    def fit(self, name: str, configs: list[str], overrides: list[str]) -> Path:
        """``clbd fit`` into ``seed<S>/<name>`` unless it finished; an interrupted one resumes from last.ckpt."""
        run_dir = self.out / name
        argv = self.seeded(configs, overrides)
        same_command_or_error(run_dir, argv)
        if (run_dir / FINISHED).exists():
            self.minutes.setdefault(name, self.earlier.get(name))
            return run_dir
        started = time.time()
        record_command(run_dir, argv)
        run_step(["fit", *argv, f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last"])
        self.minutes[name] = (time.time() - started) / 60
        return run_dir

    def test(self, run_dir: Path, configs: list[str], overrides: list[str], saved_as: str) -> dict[str, Any]:
        """``clbd test`` of ``run_dir``'s last checkpoint, its results kept as ``run_dir/saved_as``."""
        saved = run_dir / saved_as
        if not saved.exists():
            checkpoint = run_dir / "checkpoints" / "last.ckpt"
            argv = self.seeded(configs, overrides)
            run_step(["test", *argv, f"--trainer.default_root_dir={run_dir}", f"--ckpt_path={checkpoint}"])
            metrics = run_dir / "checkpoints" / "metrics.json"
            saved.write_text(json.dumps(json.loads(metrics.read_text())[checkpoint.name], indent=1) + "\n")
            metrics.unlink()  # the next test of this checkpoint (another attack) writes its own
        return json.loads(saved.read_text())


def comparable(argv: list[str]) -> list[str]:
    """``argv`` with every existing file named by it (``path`` or ``--key=path``) made absolute, so the same command
    given with relative or absolute paths (the demo's plan, the test bed's) compares equal."""

    def resolved(value: str) -> str:
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={resolved(value)}" if sep and arg.startswith("--") else resolved(arg))
    return out


def config_digests(argv: list[str]) -> dict[str, str]:
    """SHA-256 of every config file the command names: the same arguments with an edited attack config (another
    rate, another trigger) make another model."""
    paths = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    return {
        str(Path(p).resolve()): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths if Path(p).is_file()
    }


def same_command_or_error(run_dir: Path, argv: list[str]) -> None:
    """A run made by an earlier call is reused (or resumed) only for the same ``clbd fit`` arguments and the same
    contents of the config files they name: a shared ``base.dir``, an edited plan or an edited attack config would
    otherwise reuse a model made another way. Runs from before the record
    existed are reused as they are."""
    record = run_dir / COMMAND_RECORD
    if not record.exists():
        return
    saved = json.loads(record.read_text())
    earlier, now = saved.get("clbd_fit"), comparable(argv)
    if earlier != now:
        changed = sorted(set(now).symmetric_difference(earlier or []))
        raise ValueError(
            f"{run_dir} was made by another command than this plan's (arguments that differ: {' '.join(changed)}); "
            "remove that folder to redo it, or use another --out / base.dir"
        )
    if "config_digests" in saved:  # records from before digests were kept compare by arguments only
        edited = sorted(
            path for path, digest in config_digests(argv).items() if saved["config_digests"].get(path) != digest
        )
        if edited:
            raise ValueError(
                f"{run_dir} was made with other contents of {', '.join(edited)} (edited since); remove that folder "
                "to redo it, or use another --out / base.dir"
            )


def record_command(run_dir: Path, argv: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"clbd_fit": comparable(argv), "config_digests": config_digests(argv)}
    (run_dir / COMMAND_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def describe_budget(budget: dict[str, int]) -> str:
    parts = [f"{budget['steps']} optimiser steps" if "steps" in budget else "its config's steps"]
    parts.append(f"of batch {budget['batch_size']}" if "batch_size" in budget else "of its config's batch")
    if "steps" in budget and "batch_size" in budget:
        parts.append(f"({budget['steps'] * budget['batch_size']} samples)")
    return " ".join(parts)


def steps_run(run_dir: Path) -> int | None:
    finished = run_dir / FINISHED
    return json.loads(finished.read_text()).get("global_step") if finished.exists() else None


def fit_base(plan: dict[str, Any], out: Path, common: list[str], earlier: dict[str, Any]) -> tuple[str, float | None]:
    """The clean model every seed fine-tunes (``base``): trained once, with its own seed, into ``OUT/base`` or into
    ``base.dir`` (a folder several experiments share, so the clean model is trained once for all of them)."""
    base = plan["base"]
    runner = Runner(out, base.get("seed", 0), common, earlier)
    folder = Path(base["dir"]) if base.get("dir") else out / "base"
    runner.out = folder.parent  # one model for all seeds, beside the seeds' folders (or in the shared folder)
    run_dir = runner.fit(folder.name, base["configs"], flatten(base.get("overrides", [])))
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    for step in base.get("then") or []:  # e.g. BadCLIP's patch, optimised against this clean model
        if not Path(step["creates"]).exists():
            run_step([arg.replace("{base}", checkpoint) for arg in flatten(step["command"])])
            if not Path(step["creates"]).exists():
                raise ValueError(f"base.then: the command ran but did not write {step['creates']}")
    runner.minutes.setdefault("base", runner.minutes.get(folder.name))
    return checkpoint, runner.minutes.get("base")


def run_defenses(
    plan: dict[str, Any], runner: Runner, only: list[str] | None, base_checkpoint: str | None = None
) -> list[dict[str, Any]]:
    """One seed of a defense experiment: rows (clean reference, poisoned, each defense) of summaries. With a
    ``base_checkpoint`` the poisoned and the clean run fine-tune it (the papers' regime: a clean model, then
    poisoned fine-tuning); without one they train from scratch."""
    pretrain = plan["pretrain"]
    base, attack = pretrain["configs"][:1], pretrain["configs"][1:]
    overrides = flatten(pretrain.get("overrides", []))
    checkpoint = pretrain.get("checkpoint")
    if base_checkpoint is not None:  # poisoned and clean runs alike fine-tune the shared clean model
        overrides = [*overrides, f"--model.init_args.pretrained={base_checkpoint}"]
    if not checkpoint:
        checkpoint = str(runner.fit("poisoned", [*base, *attack], overrides) / "checkpoints" / "last.ckpt")
    rows: list[dict[str, Any]] = []
    if plan.get("clean_reference"):
        clean_dir = runner.fit("clean", base, overrides)
        results = runner.test(clean_dir, [*base, *attack], overrides, "eval.json")
        rows.append({"name": "clean reference", "result": summarise(results), "minutes": runner.minutes.get("clean")})
    budget = plan.get("defense_budget") or {}
    budget_args = []
    if "steps" in budget:  # the run stops at these steps and its schedule is sized to them (max_epochs off)
        budget_args += [f"--trainer.max_steps={budget['steps']}", "--trainer.max_epochs=-1"]
    if "batch_size" in budget:
        budget_args.append(f"--data.init_args.batch_size={budget['batch_size']}")
    poisoned: dict[str, Any] | None = None
    for name, defense in plan["defenses"].items():
        if only and name not in only:
            continue
        run_dir = runner.out / name
        argv = runner.seeded(
            [*defense["configs"], *attack],
            [*flatten(defense.get("overrides", [])), *budget_args, f"--model.init_args.checkpoint={checkpoint}"],
        )
        same_command_or_error(run_dir, argv)  # an edited defense (budget, lr) is refused, not silently reused
        if not (run_dir / DEFENSE_METRICS).exists():
            started = time.time()
            record_command(run_dir, argv)
            run_step(["fit", *argv, f"--trainer.default_root_dir={run_dir}", "--ckpt_path=last"])
            runner.minutes[name] = (time.time() - started) / 60
        report = json.loads((run_dir / DEFENSE_METRICS).read_text())
        if poisoned is None:  # every defense measured the same poisoned model first: its "before"
            poisoned = summarise(report["before"])
            row = {"name": "poisoned (no defense)", "result": poisoned, "minutes": runner.minutes.get("poisoned")}
            rows.insert(1 if rows else 0, row)
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
        batch = ((config.get("data") or {}).get("init_args") or {}).get("batch_size")
        steps = steps_run(run_dir)
        rows.append(
            {
                "name": name,
                "result": summarise(report["after"]),
                "steps": steps,
                "samples": steps * batch if steps is not None and batch else None,
                "minutes": runner.minutes.get(name, runner.earlier.get(name)),
                "report": str(run_dir / DEFENSE_METRICS),
            }
        )
    if poisoned is None:
        raise ValueError("no defense ran (check --only)")
    return rows


def run_grid(plan: dict[str, Any], runner: Runner) -> list[dict[str, Any]]:
    """One seed of an image-SSL experiment: per method, its clean reference against each attack, then each attack."""
    rows: list[dict[str, Any]] = []
    for method, entry in plan["methods"].items():
        base, base_overrides = entry["configs"], flatten(entry.get("overrides", []))
        clean_dir = runner.fit(f"{method}-clean", base, base_overrides)
        for attack, attack_entry in plan["attacks"].items():
            configs = [*base, *attack_entry["configs"]]
            overrides = [*base_overrides, *flatten(attack_entry.get("overrides", []))]
            results = runner.test(clean_dir, configs, overrides, f"eval-{attack}.json")
            rows.append(
                {
                    "name": f"{method} clean, {attack} trigger",
                    "result": summarise(results),
                    "minutes": runner.minutes.get(f"{method}-clean"),
                }
            )
            run_dir = runner.fit(f"{method}-{attack}", configs, overrides)
            results = runner.test(run_dir, configs, overrides, "eval.json")
            rows.append(
                {
                    "name": f"{method} + {attack}",
                    "result": summarise(results),
                    "minutes": runner.minutes.get(f"{method}-{attack}"),
                }
            )
    return rows


def check_before_compute(plan: dict[str, Any]) -> None:
    common = flatten(plan.get("common", []))
    if "methods" in plan:
        for method, entry in plan["methods"].items():
            for attack, attack_entry in plan["attacks"].items():
                configs = [*entry["configs"], *attack_entry["configs"]]
                overrides = [*flatten(entry.get("overrides", [])), *flatten(attack_entry.get("overrides", [])), *common]
                check_eval_set(f"methods.{method} x attacks.{attack}", configs, overrides)
    else:
        pretrain = plan["pretrain"]
        check_eval_set("pretrain", pretrain["configs"], [*flatten(pretrain.get("overrides", [])), *common])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clbd experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="experiment file (configs/experiment/*.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder for every run of the experiment")
    parser.add_argument("--only", nargs="*", help="run only these defenses")
    parser.add_argument("--seeds", nargs="*", type=int, help="override the file's seeds")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.config)
        if args.seeds is not None:
            if not args.seeds:
                raise ValueError("--seeds: give at least one seed")
            plan["seeds"] = args.seeds
        check_before_compute(plan)
    except (ValueError, FileNotFoundError) as exc:
        print(f"clbd experiment: error: {exc}", file=sys.stderr)
        return 2
    out = args.out
    earlier_path = out / "table.json"  # a rerun keeps the minutes of the steps it does not run again
    earlier = json.loads(earlier_path.read_text()).get("minutes", {}) if earlier_path.exists() else {}
    common = flatten(plan.get("common", []))
    per_seed_rows: dict[int, list[dict[str, Any]]] = {}
    minutes: dict[str, dict[str, float | None]] = {}
    base_checkpoint = None
    if plan.get("base"):
        base_checkpoint, base_minutes = fit_base(plan, out, common, earlier.get("base") or {})
        minutes["base"] = {"base": base_minutes}
    for seed in plan["seeds"]:
        runner = Runner(out, seed, common, earlier.get(str(seed), {}))
        try:
            if "methods" in plan:
                rows = run_grid(plan, runner)
            else:
                rows = run_defenses(plan, runner, args.only, base_checkpoint)
        except ValueError as exc:
            print(f"clbd experiment: error: {exc}", file=sys.stderr)
            return 2
        per_seed_rows[seed] = rows
        minutes[str(seed)] = {**runner.earlier, **runner.minutes}
    table = build_table(plan, args.config, per_seed_rows, minutes)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    (out / "table.md").write_text(text)
    title = f"{args.config.stem}: mean and 95% interval over seeds {table['seeds']}"
    bar_chart(table, out / "table.png", title)
    print("\n" + text)
    print(f"Written: {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'}")
    return 0


def build_table(
    plan: dict[str, Any], config: Path, per_seed_rows: dict[int, list[dict[str, Any]]], minutes: dict[str, Any]
) -> dict[str, Any]:
    from lightning_modules.metrics import BACKDOOR_DEFINITIONS

    names = [row["name"] for row in next(iter(per_seed_rows.values()))]
    rows = []
    for name in names:
        per_seed = {str(seed): next(r for r in rows_ if r["name"] == name) for seed, rows_ in per_seed_rows.items()}
        results = {seed: r["result"] for seed, r in per_seed.items()}
        row: dict[str, Any] = {
            "name": name,
            "per_seed": results,
            "summary": aggregate(results),
            "minutes": {seed: r.get("minutes") for seed, r in per_seed.items()},
        }
        steps = {r.get("steps") for r in per_seed.values()}
        samples = {r.get("samples") for r in per_seed.values()}
        if steps != {None}:
            row["steps"], row["samples"] = (
                sorted(s for s in steps if s is not None),
                sorted(s for s in samples if s is not None),
            )
            row["budget"] = f"{'/'.join(map(str, row['steps']))} steps, {'/'.join(map(str, row['samples']))} samples"
        rows.append(row)
    budget = plan.get("defense_budget")
    note = None
    if "defenses" in plan and "methods" not in plan:
        note = (
            "Budget: optimiser steps of each defense's training loop (from its fit_finished.json) and samples seen "
            "(steps x batch size); "
            + (
                f"every defense was given {describe_budget(budget)}."
                if budget
                else "no common budget was set (defense_budget): each ran its own config's."
            )
            + " Stage-1 work outside that loop (UBT's overfitting steps, MCLDef's trigger inversion) is in each "
            "defense's defense_metrics.json."
        )
    return {
        "experiment": str(config),
        "seeds": plan["seeds"],
        "interval": INTERVAL,
        "definitions": {
            "CA": "clean top-1 accuracy (linear probe for image SSL, zero-shot for CLIP)",
            **{k: v for k, v in BACKDOOR_DEFINITIONS.items() if k != "histograms"},
        },
        "budget_note": note,
        "defense_budget": budget,
        "rows": rows,
        "minutes": minutes,
    }
