"""An experiment as arms: each unit of work (a clean base, a pretraining with its evaluations, a defense of a poisoned
model) has a stable id, the arms it needs, its ``clbd`` commands and the files that say it is done.

The id is also the arm's folder under ``--out`` and under an exported results folder (``seed0/poisoned``,
``seed1/cleanclip@500x0.0005``), so an arm run on a GPU, in a SLURM array task or on a laptop is found the same way
when the table is assembled. The shared clean model (``base``) may live elsewhere (``base.dir``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defenses.base import DEFENSE_METRICS

from .plan import Budget, budgets, config_args, cpu_precision, flatten

FINISHED = "fit_finished.json"
CHECKPOINT = "checkpoints/last.ckpt"


@dataclass
class Arm:
    """One unit of an experiment.

    Attributes:
        id: stable name, also its folder under ``--out`` and in exported results.
        kind: ``base`` (the shared clean model), ``model`` (a pretraining or fine-tuning with its evaluations, or
            only the evaluations of a given checkpoint) or ``defense``.
        run_dir: where it runs here.
        fit: ``clbd fit`` arguments (no run directory, no ``--ckpt_path``); None: the model is given (``checkpoint``).
        evaluations: results file -> ``clbd test`` arguments, each run on the arm's checkpoint.
        needs: ids of the arms whose checkpoints this one starts from.
        row: the table row its numbers go to; ``rows``: one per evaluation file (the clean model's evaluation under
            each attack's trigger).
        then: base only: ``clbd`` commands run once after it (``{base}`` = its checkpoint) and the file each creates.
    """

    id: str
    kind: str
    seed: int | None
    run_dir: Path
    fit: list[str] | None
    evaluations: dict[str, list[str]] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    rows: dict[str, str] = field(default_factory=dict)
    defense: str | None = None
    budget: Budget | None = None
    checkpoint: str | None = None
    then: list[dict[str, Any]] = field(default_factory=list)
    role: str = ""  # clean / poisoned / defense: how the table reads the row
    group: str = ""  # the clean row a defense or poisoned row is compared with

    def done_files(self) -> list[str]:
        if self.kind == "defense":
            return [DEFENSE_METRICS]
        return ([FINISHED] if self.fit is not None else []) + list(self.evaluations)

    def model_checkpoint(self) -> str:
        return self.checkpoint or str(self.run_dir / CHECKPOINT)


ATTACK_ARGUMENT = "--data.init_args.attack"


def expand(plan: dict[str, Any], out: Path) -> list[Arm]:
    """Every arm of the plan, each after the arms it needs."""
    common = flatten(plan.get("common", []))
    arms: list[Arm] = []
    base_checkpoint = None
    if plan.get("base"):
        base = plan["base"]
        folder = Path(base["dir"]) if base.get("dir") else out / "base"
        argv = seeded(config_args(base["configs"]), common, flatten(base.get("overrides", [])), base.get("seed", 0))
        arms.append(Arm("base", "base", base.get("seed", 0), folder, argv, then=list(base.get("then") or [])))
        base_checkpoint = str(folder / CHECKPOINT)
    for seed in plan["seeds"]:
        if "methods" in plan:
            arms += grid_arms(plan, out, seed, common)
        else:
            arms += defense_plan_arms(plan, out, seed, common, base_checkpoint)
    return arms


def seeded(configs: list[str], common: list[str], overrides: list[str], seed: int) -> list[str]:
    """configs, then the common overrides, then the step's own, then the seed (initialisation, data order and
    augmentations; the attack's own seed stays the config's, so every seed measures the same attack)."""
    return cpu_precision([*configs, *common, *overrides, f"--seed_everything={seed}", f"--data.init_args.seed={seed}"])


def defense_plan_arms(
    plan: dict[str, Any], out: Path, seed: int, common: list[str], base_checkpoint: str | None
) -> list[Arm]:
    folder = out / f"seed{seed}"
    pretrain = plan["pretrain"]
    model, attack = pretrain["configs"][:1], pretrain["configs"][1:]
    overrides = flatten(pretrain.get("overrides", []))
    needs: tuple[str, ...] = ()
    if base_checkpoint is not None:  # poisoned and clean runs alike fine-tune the shared clean model
        overrides = [*overrides, f"--model.init_args.pretrained={base_checkpoint}"]
        needs = ("base",)
    poisoned_argv = seeded(config_args([*model, *attack]), common, overrides, seed)
    given = pretrain.get("checkpoint")
    arms = []
    poisoned = Arm(
        f"seed{seed}/poisoned",
        "model",
        seed,
        folder / "poisoned",
        None if given else poisoned_argv,
        evaluations={"eval.json": poisoned_argv},
        needs=needs,
        rows={"eval.json": "poisoned (no defense)"},
        checkpoint=given,
        role="poisoned",
        group="clean reference",
    )
    if plan.get("clean_reference"):
        # The attack's overrides (its rate, ...) compute nothing without the attack: the clean reference of a bed at
        # 10% is the one of the same bed at 0.5%, and is recorded (and reused) as that command.
        clean_overrides = [o for o in overrides if not o.startswith((f"{ATTACK_ARGUMENT}=", f"{ATTACK_ARGUMENT}."))]
        clean_argv = seeded(config_args(model), common, clean_overrides, seed)
        arms.append(
            Arm(
                f"seed{seed}/clean",
                "model",
                seed,
                folder / "clean",
                clean_argv,
                evaluations={"eval.json": poisoned_argv},  # the clean model under the same attack's trigger
                needs=needs,
                rows={"eval.json": "clean reference"},
                role="clean",
            )
        )
    arms.append(poisoned)
    arms += defense_arms(plan, folder, seed, common, poisoned, attack, "clean reference")
    return arms


def grid_arms(plan: dict[str, Any], out: Path, seed: int, common: list[str]) -> list[Arm]:
    """Per method: its clean model (evaluated under every attack's trigger), then each attack."""
    folder = out / f"seed{seed}"
    arms: list[Arm] = []
    for method, entry in plan["methods"].items():
        model, model_overrides = entry["configs"], flatten(entry.get("overrides", []))
        clean = Arm(
            f"seed{seed}/{method}-clean",
            "model",
            seed,
            folder / f"{method}-clean",
            seeded(config_args(model), common, model_overrides, seed),
            role="clean",
        )
        arms.append(clean)
        for attack in entry.get("attacks") or plan["attacks"]:  # a method may take only some of the attacks
            attack_entry = plan["attacks"][attack]
            configs = [*model, *attack_entry["configs"]]
            argv = seeded(
                config_args(configs), common, [*model_overrides, *flatten(attack_entry.get("overrides", []))], seed
            )
            clean.evaluations[f"eval-{attack}.json"] = argv
            clean.rows[f"eval-{attack}.json"] = f"{method} clean, {attack} trigger"
            poisoned = Arm(
                f"seed{seed}/{method}-{attack}",
                "model",
                seed,
                folder / f"{method}-{attack}",
                argv,
                evaluations={"eval.json": argv},
                rows={"eval.json": f"{method} + {attack}"},
                role="poisoned",
                group=f"{method} clean, {attack} trigger",
            )
            arms.append(poisoned)
            if plan.get("defenses") and plan.get("defend") == f"{method}-{attack}":
                arms += defense_arms(plan, folder, seed, common, poisoned, attack_entry["configs"], poisoned.group)
    return arms


def defense_arms(
    plan: dict[str, Any], folder: Path, seed: int, common: list[str], poisoned: Arm, attack: list[str], group: str
) -> list[Arm]:
    """Every defense at every budget, each from the poisoned arm's checkpoint (the attack config is added: its test
    trigger measures ASR, its target names the class a defense inverts)."""
    arms = []
    ladder = budgets(plan)
    for name, defense in (plan.get("defenses") or {}).items():
        for budget in ladder:
            arm_id = f"{name}@{budget.suffix}" if budget.suffix else name
            overrides = [
                *flatten(defense.get("overrides", [])),
                *budget.overrides(),
                f"--model.init_args.checkpoint={poisoned.model_checkpoint()}",
            ]
            argv = seeded(config_args([*defense["configs"], *attack]), common, overrides, seed)
            arms.append(
                Arm(
                    f"seed{seed}/{arm_id}",
                    "defense",
                    seed,
                    folder / arm_id,
                    argv,
                    needs=(poisoned.id,) if poisoned.fit is not None else (),
                    rows={DEFENSE_METRICS: f"{name} @ {budget.label()}" if budget.suffix else name},
                    defense=name,
                    budget=budget,
                    role="defense",
                    group=group,
                )
            )
    return arms


def stage(arm: Arm, by_id: dict[str, Arm]) -> int:
    """0 for an arm that needs nothing, else one more than the deepest arm it needs (SLURM runs stages in order)."""
    return 0 if not arm.needs else 1 + max(stage(by_id[n], by_id) for n in arm.needs)
