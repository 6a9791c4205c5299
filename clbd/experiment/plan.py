"""The experiment file: read, checked before any compute (errors name the field), and the budgets of its defenses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BUDGET_KEYS = ("steps", "batch_size", "lr")


@dataclass(frozen=True)
class Budget:
    """What a defense may spend: optimiser steps, batch size, learning rate (each None: the defense config's own).

    ``suffix`` names the run folder of a budget of a ladder (``cleanclip@500x5e-4``); the single ``defense_budget``
    of older plans has none, so their finished runs are found where they are."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    suffix: str = ""

    def overrides(self) -> list[str]:
        """After the defense's own overrides: the run stops at ``steps`` and sizes its schedule to them."""
        out = []
        if self.steps is not None:
            out += [f"--trainer.max_steps={self.steps}", "--trainer.max_epochs=-1"]
        if self.batch_size is not None:
            out.append(f"--data.init_args.batch_size={self.batch_size}")
        if self.lr is not None:
            out.append(f"--model.init_args.lr={self.lr}")
        return out

    def label(self) -> str:
        parts = [f"{self.steps} steps" if self.steps is not None else "config's steps"]
        if self.batch_size is not None:
            parts.append(f"batch {self.batch_size}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:g}")
        return ", ".join(parts)

    def samples(self) -> int | None:
        return self.steps * self.batch_size if self.steps is not None and self.batch_size is not None else None


def budgets(plan: dict[str, Any]) -> list[Budget]:
    """``defense_budgets`` (a ladder: one run of every defense per budget) or the single ``defense_budget``."""
    if plan.get("defense_budgets"):
        ladder = []
        for entry in plan["defense_budgets"]:
            suffix = "x".join(f"{entry[k]:g}" if k == "lr" else str(entry[k]) for k in BUDGET_KEYS if k in entry)
            ladder.append(Budget(**{k: entry.get(k) for k in BUDGET_KEYS}, suffix=suffix))
        return ladder
    return [Budget(**{k: (plan.get("defense_budget") or {}).get(k) for k in BUDGET_KEYS})]


def check_budgets(path: Path, plan: dict[str, Any]) -> None:
    if plan.get("defense_budget") and plan.get("defense_budgets"):
        raise ValueError(f"{path}: give defense_budget (one budget) or defense_budgets (a ladder), not both")
    entries = plan.get("defense_budgets")
    if entries is not None and (not isinstance(entries, list) or not entries):
        raise ValueError(f"{path}: defense_budgets must be a non-empty list of {{steps, batch_size, lr}}")
    named = [("defense_budget", plan.get("defense_budget") or {})]
    named += [(f"defense_budgets[{i}]", e) for i, e in enumerate(entries or [])]
    for where, budget in named:
        if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
            raise ValueError(f"{path}: {where} takes only {', '.join(BUDGET_KEYS)}, got {budget!r}")
        for key in ("steps", "batch_size"):
            value = budget.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{path}: {where}.{key} must be an integer >= 1, got {value!r}")
        lr = budget.get("lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"{path}: {where}.lr must be a number > 0, got {lr!r}")
    suffixes = [b.suffix for b in budgets(plan)]
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"{path}: defense_budgets repeats a budget")


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
        for name, entry in plan["methods"].items():
            unknown = sorted(set(entry.get("attacks") or []) - set(plan["attacks"]))
            if unknown:
                raise ValueError(f"{path}: methods.{name}.attacks names {', '.join(unknown)}, not in attacks")
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
        configs = [
            *(base or {}).get("configs", []),
            *pretrain["configs"],
            *(c for d in plan["defenses"].values() for c in d.get("configs", [])),
        ]
    if grid and plan.get("defenses"):
        defend = plan.get("defend")
        arms = [f"{m}-{a}" for m in plan["methods"] for a in plan["attacks"]]
        if defend not in arms:
            raise ValueError(f"{path}: defend must name the poisoned model the defenses start from, one of {arms}")
        configs += [c for d in plan["defenses"].values() for c in d.get("configs", [])]
    check_budgets(path, plan)
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


def check_before_compute(plan: dict[str, Any]) -> None:
    common = flatten(plan.get("common", []))
    if "methods" in plan:
        for method, entry in plan["methods"].items():
            for attack in entry.get("attacks") or plan["attacks"]:
                attack_entry = plan["attacks"][attack]
                configs = [*entry["configs"], *attack_entry["configs"]]
                overrides = [*flatten(entry.get("overrides", [])), *flatten(attack_entry.get("overrides", [])), *common]
                check_eval_set(f"methods.{method} x attacks.{attack}", configs, overrides)
    else:
        pretrain = plan["pretrain"]
        check_eval_set("pretrain", pretrain["configs"], [*flatten(pretrain.get("overrides", [])), *common])
