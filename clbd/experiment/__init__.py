"""``clbd experiment``: attack x defense, or attack x image-SSL method, over seeds, as a table (JSON + Markdown) and
pictures (PNG), every number a mean with a 95% interval, assembled from arms that may run anywhere.

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
    defense_budget: {steps: 200, batch_size: 64}   # the same optimiser steps x batch for every defense, or a ladder:
    # defense_budgets: [{steps: 100, lr: 1.0e-4}, {steps: 500, lr: 5.0e-4}]   # every defense at every budget
    control: finetune               # the defense that is plain fine-tuning (the ladder's summary compares with it)
    defenses:                       # name -> the defense's configs (the attack config is added by the runner)
      cleanclip: {configs: [configs/defense/cleanclip.yaml], overrides: [...]}

Image SSL (attack x method, each method with a clean reference; optionally defenses of one poisoned model)::

    seeds: [0, 1, 2]
    methods: {simclr: {configs: [configs/smoke/simclr_shapes.yaml], overrides: []}}
    attacks: {na: {configs: [configs/smoke/na_shapes.yaml]}, sslbkd: {configs: [...]}}
    defend: simclr-na               # with defenses: the METHOD-ATTACK model they start from
    defenses: {mcldef: {configs: [configs/defense/mcldef_simclr.yaml]}}

**Arms.** Each unit of work is an arm with a stable id (``base``, ``seed0/poisoned``, ``seed0/clean``,
``seed0/cleanclip``, ``seed0/cleanclip@500x0.0005`` for a budget of a ladder, ``seed0/simclr-na``); ``--list`` shows
them, what each needs and where its results are; ``--arm ID`` runs one (a defense arm where its poisoned arm's
checkpoint is). ``--export DIR`` copies finished arms' small files (config, command record, results, poison
summary, data report, the monitor CSV, provenance: code commit, device, versions, precision, wall times) to
``DIR/<arm id>/``; ``--from DIR`` takes finished arms from such folders, so a table is assembled from arms that ran
on a GPU, in a SLURM array and on a laptop, refusing any whose record names another command than the plan's and
naming the arms still missing; ``--assemble`` runs nothing.

The seed goes to ``seed_everything`` and ``data.seed`` (initialisation, data order, augmentations); the attack's own
seed (which samples are poisoned, the trigger) stays the config's, so every seed measures the same attack. Runs
that finished are reused; an interrupted fit resumes from its ``last.ckpt``; in both cases only for the
``clbd fit`` arguments and config-file contents that made the run (recorded in its ``experiment_command.json``). On
a machine without CUDA, or with ``--trainer.accelerator=cpu``, every step runs in 32-bit
(``--trainer.precision=32-true``) unless an override says otherwise, so no row runs bf16 on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arms import Arm, expand, stage
from .charts import bar_chart, budget_curves, tradeoff
from .export import export, replace_block
from .plan import check_before_compute, load_plan
from .runs import run_arm
from .table import METRICS, build_table, collect, interval, markdown

__all__ = ["METRICS", "interval", "main", "load_plan"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="clbd experiment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="experiment file (configs/experiment/*.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="folder for every run of the experiment and its table")
    parser.add_argument("--only", nargs="*", help="run only these defenses")
    parser.add_argument("--seeds", nargs="*", type=int, help="override the file's seeds")
    parser.add_argument("--list", action="store_true", help="print the arms, what each needs, done or not, where")
    parser.add_argument("--json", action="store_true", help="with --list: one JSON object per arm (for scripts)")
    parser.add_argument("--arm", nargs="+", metavar="ID", help="run only these arms (no table)")
    parser.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="also take finished arms from these exported folders (e.g. results/PLAN)",
    )
    parser.add_argument("--assemble", action="store_true", help="run nothing: the table from the finished arms")
    parser.add_argument(
        "--export", type=Path, metavar="DIR", help="copy each finished arm's small files to DIR/<arm id>/"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="FILE",
        help="also put the table between <!-- clbd-table: PLAN --> and <!-- /clbd-table: PLAN --> in FILE",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        plan = load_plan(args.config)
        if args.seeds is not None:
            if not args.seeds:
                raise ValueError("--seeds: give at least one seed")
            plan["seeds"] = args.seeds
        if args.only:
            unknown = sorted(set(args.only) - set(plan.get("defenses") or {}))
            if unknown:
                raise ValueError(f"--only: no defense {', '.join(unknown)} in {args.config}")
            plan["defenses"] = {k: v for k, v in plan["defenses"].items() if k in args.only}
        arms = expand(plan, args.out)
        by_id = {arm.id: arm for arm in arms}
        unknown = sorted(set(args.arm or []) - set(by_id))
        if unknown:
            raise ValueError(f"--arm: no arm {', '.join(unknown)} in {args.config} (clbd experiment ... --list)")
        for source in args.sources:
            if not source.is_dir():
                raise FileNotFoundError(f"--from: no such folder: {source}")
        if args.list:
            return list_arms(arms, by_id, args)
        if not args.assemble:
            check_before_compute(plan)
        for arm in arms if not args.assemble else []:
            if not args.arm or arm.id in args.arm:
                run_arm(arm, by_id, args.out)
        if args.export:
            exported = export(arms, args.export)
            print(f"Exported {len(exported)} arms to {args.export}: {', '.join(exported) or 'none finished'}")
        if args.arm:
            return 0
        found, missing = collect(arms, args.out, args.sources)
        table = build_table(plan, args.config, arms, found, missing)
    except (ValueError, FileNotFoundError) as exc:
        print(f"clbd experiment: error: {exc}", file=sys.stderr)
        return 2
    write_table(table, args)
    return 0


def write_table(table: dict, args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    (out / "table.md").write_text(text)
    present = sorted({seed for row in table["rows"] for seed in row["seeds"]})
    title = f"{args.config.stem}: mean and 95% interval over the seeds in so far, {present} of {table['seeds']}"
    written = [out / "table.json", out / "table.md"]
    if any(row["per_seed"] for row in table["rows"]):
        bar_chart(table, out / "table.png", title)
        written.append(out / "table.png")
    if budget_curves(table, out / "budget_curves.png", title):
        written.append(out / "budget_curves.png")
    if tradeoff(table, out / "tradeoff.png", title):
        written.append(out / "tradeoff.png")
    if args.readme:
        replace_block(args.readme, args.config.stem, text)
        written.append(args.readme)
    print("\n" + text)
    print("Written: " + ", ".join(map(str, written)))


def list_arms(arms: list[Arm], by_id: dict[str, Arm], args: argparse.Namespace) -> int:
    found, _ = collect(arms, args.out, args.sources)
    for arm in arms:
        where = found.get(arm.id)
        state = "done" if where is not None else "pending"
        if args.json:
            record = {"id": arm.id, "kind": arm.kind, "stage": stage(arm, by_id), "needs": list(arm.needs)}
            record.update(state=state, evaluations=list(arm.evaluations))  # each a clbd test of the arm's model
            print(json.dumps({**record, "where": str(where or arm.run_dir)}))
        else:
            needs = f" (needs {', '.join(arm.needs)})" if arm.needs else ""
            print(f"{arm.id:<40} {state:<8} {where or arm.run_dir}{needs}")
    return 0
