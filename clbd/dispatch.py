"""The ``clbd`` command: LightningCLI's fit / validate / test (``runner``), plus the data, poison, demo, experiment
and consolidate tools."""

from __future__ import annotations

import sys

from .logs import configure_logging, take_verbose_flag
from .run_dir import FINISHED_MARKER

TOOLS = {
    "data": "convert datasets to WebDataset shards and inspect shard sets (clbd data --help)",
    "poison": "poison attacks / manifest / preview / geometry / optimize-trigger (BadCLIP), offline (clbd poison --help)",
    "demo": "the README's main job: clean vs NA-poisoned SimCLR on the built-in dataset, then CA / ASR",
    "experiment": "attack x defense table on one poisoned checkpoint (clbd experiment --help)",
    "consolidate": "fp32 single-file copy of a DeepSpeed checkpoint folder (printed); files are returned as is",
}
TRAINER_COMMANDS = {
    "fit": "train (pretraining or a defense's fine-tuning); --ckpt_path last resumes a run",
    "validate": "run the per-epoch monitors once on a checkpoint",
    "test": "evaluate a checkpoint (kNN / linear probe / zero-shot CA and ASR); writes metrics.json",
}


def _top_level_help() -> str:
    lines = [
        "usage: clbd [--verbose] COMMAND [options]",
        "",
        "Training and evaluation (LightningCLI; clbd COMMAND --help):",
    ]
    lines += [f"  {name:<12}{text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "Tools:"]
    lines += [f"  {name:<12}{text}" for name, text in TOOLS.items()]
    lines += [
        "",
        "Examples:",
        "  clbd data cifar10 --src cifar10-jpg.tar.gz --out data/cifar10",
        "  clbd fit --config configs/pretrain/simclr_cifar10.yaml --config configs/attack/na_cifar10.yaml",
        "  clbd test --config runs/x/config.yaml --ckpt_path runs/x/checkpoints/last.ckpt",
        f"Run directories hold config.yaml, checkpoints/, metrics.csv and {FINISHED_MARKER} once fit ends.",
        "clbd logs its own messages at INFO and other libraries' at WARNING; --verbose (or CLBD_LOG_LEVEL=INFO or",
        "DEBUG) shows the libraries' INFO lines too.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = take_verbose_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        configure_logging()
    except ValueError as exc:
        print(f"clbd: error: {exc}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "data":
        from .data import main as data_main

        return data_main(rest)
    if command == "poison":
        from .poison import main as poison_main

        return poison_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "consolidate":
        from lightning_modules.checkpoints import consolidate

        try:
            print(consolidate(rest[0]) if len(rest) == 1 else "usage: clbd consolidate CHECKPOINT")
        except (ValueError, FileNotFoundError) as exc:
            print(f"clbd consolidate: error: {exc}", file=sys.stderr)
            return 2
        return 0 if len(rest) == 1 else 2
    if command == "experiment":
        from .experiment import main as experiment_main

        return experiment_main(rest)
    if command not in TRAINER_COMMANDS and command != "predict":
        print(f"clbd: unknown command {command!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    from .runner import run

    return run(argv)
