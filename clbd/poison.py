"""``clbd poison``: look at an attack without training — the attacks there are, its manifest, a picture of its
samples, its geometry.

The config files are the same ones ``clbd fit`` takes (only their ``data:`` part is used), so what is shown is
exactly what a run with those files would poison.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import poisoning
from datamodules import ShardDataModule
from datamodules.catalog import load_raw_samples
from datamodules.decode import decode_sample
from datamodules.faults import FaultCounter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def attack_configs(class_name: str, configs: Path = CONFIGS) -> list[str]:
    """The shipped config files (relative to ``configs``' parent) whose attack is ``poisoning.<class_name>``."""
    found = []
    for path in sorted(configs.glob("*/*.yaml")):
        attack = ((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("init_args", {}).get("attack")
        if isinstance(attack, dict) and attack.get("class_path") == f"poisoning.{class_name}":
            found.append(str(path.relative_to(configs.parent)))
    return found


def attack_table(configs: Path = CONFIGS) -> list[dict[str, Any]]:
    """One row per attack of ``poisoning.ATTACKS``: name, class, modality, summary and its config files."""
    return [
        {
            "name": name,
            "class_path": f"poisoning.{cls.__name__}",
            "modality": cls.modality,
            "summary": cls.summary,
            "configs": attack_configs(cls.__name__, configs),
        }
        for name, cls in poisoning.ATTACKS.items()
    ]


def list_attacks() -> str:
    lines = []
    for row in attack_table():
        lines.append(f"{row['name']:<22}{row['modality']:<12}{row['class_path']}")
        lines.append(f"{'':<22}{row['summary']}")
        lines.append(f"{'':<22}config: {', '.join(row['configs']) or '-'}")
    return "\n".join(lines)


def load_datamodule(config_files: list[str], overrides: list[str], need_attack: bool = True) -> ShardDataModule:
    """Instantiate only ``data:`` from clbd config files (composed in order) and ``--data.*`` overrides.

    Run directories' ``config.yaml`` hold every section LightningCLI knows; only ``data`` is read here, so this
    keeps working whatever else a config carries.
    """
    parser = ArgumentParser(prog="clbd poison", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_subclass_arguments(ShardDataModule, "data", required=True)
    args: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(config_files):
            try:
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except FileNotFoundError:
                raise FileNotFoundError(f"--config: no such file: {path}") from None
            data_only = Path(tmp) / f"{i}.yaml"
            data_only.write_text(yaml.safe_dump({"data": loaded["data"]} if "data" in loaded else {}))
            args += ["--config", str(data_only)]
        config = parser.parse_args(args + overrides)
    datamodule = parser.instantiate_classes(config).data
    if not need_attack:
        return datamodule
    if datamodule.attack is None:
        raise ValueError("data.attack: the config sets no attack (add e.g. --config configs/attack/na_cifar10.yaml)")
    datamodule.attack.validate(datamodule.modality, datamodule.class_names, datamodule.image_size)
    return datamodule


def write_manifest(datamodule: ShardDataModule, out: Path, overwrite: bool) -> dict[str, Any]:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    plan = datamodule.build_plan()
    out.parent.mkdir(parents=True, exist_ok=True)
    plan.write_manifest(out)
    return plan.summary()


def configured_attack(config_files: list[str], overrides: list[str]) -> tuple[str, str]:
    """What a user calls the attack and where it was set: the stem of the last config file that sets ``data``'s
    attack (``patch_shapes`` for configs/attack/patch_shapes.yaml; a run's ``config.yaml`` by its run folder), or the
    command-line option that replaced it. The class's own short name (``badclip``) can stand for several attacks."""
    for index in range(len(overrides) - 1, -1, -1):
        option, _, value = overrides[index].partition("=")
        if option in ("--data.attack", "--data.init_args.attack"):
            value = value or (overrides[index + 1] if index + 1 < len(overrides) else "")
            return value.rsplit(".", 1)[-1], option
    for path in reversed(config_files):
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
        if "attack" in data or "attack" in (data.get("init_args") or {}):
            path = Path(path)
            return (f"{path.parent.name}/{path.stem}" if path.stem == "config" else path.stem), str(path)
    return "", ""


def preview_rows(datamodule: ShardDataModule, keys: list[str], plan) -> list[dict]:
    """One row per poisoned sample: original and poisoned (their captions in full for CLIP), then SimCLR's two views."""
    raw = load_raw_samples(datamodule.index("train"), keys)
    faults = FaultCounter()
    rows = []
    for key in keys:
        sample = decode_sample(raw[key], faults, need_label=False, need_text=datamodule.modality == "image-text")
        if sample is None:
            continue
        original = sample["image"]
        poisoned = plan.apply(dict(sample))
        record = plan.poisoned[key]
        images, labels = [original, poisoned["image"]], ["original", "poisoned"]
        if datamodule.modality == "image":
            from torchvision.transforms.v2.functional import to_pil_image

            views = datamodule.train_item(poisoned, epoch=0)["views"]
            mean, std = datamodule.augmentation.mean, datamodule.augmentation.std
            for i, view in enumerate(views):
                pixels = (view * view.new_tensor(std)[:, None, None] + view.new_tensor(mean)[:, None, None]).clamp(0, 1)
                images.append(to_pil_image(pixels))
                labels.append(f"view {i + 1}")
        else:
            labels = [f"original: {sample['text']}", f"poisoned: {poisoned['text']}"]
        rows.append({"title": f"{key}  {record.arrangement or ''}".strip(), "images": images, "labels": labels})
    return rows


def preview_heading(datamodule: ShardDataModule, name: str, source: str) -> str:
    attack = datamodule.attack
    shown = ", view 1, view 2 (what SimCLR sees)" if datamodule.modality == "image" else " (with their captions)"
    where = f" from {source}" if source else ""
    trigger = getattr(attack, "trigger", None)
    described = dict(trigger.describe()) if trigger is not None else {}
    trigger_text = " ".join([f", trigger {described.pop('class')}", *(f"{k}={v}" for k, v in described.items())])
    return (
        f"Attack as configured: {name or attack.name}{where} ({type(attack).__module__.split('.')[0]}."
        f"{type(attack).__name__}, target {attack.target_class!r}{trigger_text if trigger else ''}). Each row is "
        f"one poisoned sample: original, poisoned{shown}."
    )


def preview(
    datamodule: ShardDataModule, out: Path, count: int, overwrite: bool, name: str = "", source: str = ""
) -> int:
    """A grid: original, poisoned, and what the model sees (SimCLR's two views / CLIP's image and caption), under a
    heading that names the attack as configured (``configured_attack``)."""
    from poisoning.preview import render_grid

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    plan = datamodule.build_plan()
    keys = [record.key for record in plan.records()[:count]]
    if not keys:
        raise ValueError("the attack poisons no sample of these shards (rate/count too small?)")
    rows = preview_rows(datamodule, keys, plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(rows, str(out), heading=preview_heading(datamodule, name, source))
    return len(rows)


def main(argv: list[str]) -> int:
    top = argparse.ArgumentParser(prog="clbd poison", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("attacks", help="list the attacks: name, modality, class path, summary and config files")
    for name, text in (
        ("manifest", "write the poison manifest (JSON lines) a run with these configs would write"),
        ("preview", "render poisoned samples and their views to a PNG grid"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("--config", action="append", required=True, help="clbd config file(s), as for clbd fit")
        sub.add_argument("--out", required=True, type=Path)
        sub.add_argument("--overwrite", action="store_true")
        if name == "preview":
            sub.add_argument("--count", type=int, default=8, help="poisoned samples to show")
    optimize = commands.add_parser(
        "optimize-trigger",
        help="optimise a BadCLIP patch against a CLIP checkpoint",
        description=OPTIMIZE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_optimize_arguments(optimize)
    geometry = commands.add_parser("geometry", help="Monte-Carlo view geometry of NA vs baselines (docs table)")
    geometry.add_argument("rest", nargs=argparse.REMAINDER)
    args, extra = top.parse_known_args(argv)
    if args.command == "attacks":
        print(list_attacks())
        return 0
    if args.command == "geometry":
        from poisoning.geometry import main as geometry_main

        return geometry_main(args.rest + extra)
    if args.command == "optimize-trigger":
        return optimize_trigger(args, extra)
    try:
        datamodule = load_datamodule(args.config, extra)
        if args.command == "manifest":
            summary = write_manifest(datamodule, args.out, args.overwrite)
            print(f"wrote {args.out}: {summary}")
        else:
            name, source = configured_attack(args.config, extra)
            shown = preview(datamodule, args.out, args.count, args.overwrite, name, source)
            print(f"wrote {args.out}: {shown} poisoned samples")
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"clbd poison {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


OPTIMIZE_HELP = """Optimise a BadCLIP trigger patch (Liang et al., CVPR 2024) against a frozen CLIP checkpoint.

The clean images, the target's captions and its images come from the training shards of the --config files
(a CLIP data config, e.g. configs/pretrain/clip_cc3m.yaml). Writes OUT/trigger.png, OUT/trigger.json (settings,
initial and final loss) and OUT/captions.txt (the captions used, for the attack's caption_file); an interrupted run
continues from OUT/optimize_state.pt. Then poison with configs/attack/badclip.yaml.

  clbd poison optimize-trigger --config configs/pretrain/clip_cc3m.yaml --checkpoint RUN/checkpoints/last.ckpt \\
      --target banana --out triggers/badclip-banana
"""


def add_optimize_arguments(parser: argparse.ArgumentParser) -> None:
    from clbd.badclip_trigger import PatchRecipe

    recipe = PatchRecipe()
    parser.add_argument("--config", action="append", required=True, help="clbd config file(s) with a CLIP data:")
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a clbd CLIP run's .ckpt, a local open_clip file, or an open_clip pretrained tag (openai, ...) with --model",
    )
    parser.add_argument("--model", default=None, help="open_clip architecture of an open_clip file or tag (e.g. RN50)")
    parser.add_argument("--target", required=True, help="the target class name (e.g. banana)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the trigger and its settings")
    parser.add_argument(
        "--captions", choices=("natural", "templates"), default="natural", help="natural: captions that name the target"
    )
    parser.add_argument("--caption-file", default=None, help="natural captions, one a line (default: the shards')")
    parser.add_argument("--reference-dir", default=None, help="target-class images (default: the shards')")
    parser.add_argument("--max-images", type=int, default=10_000, help="clean images (BadCLIP: 10k)")
    parser.add_argument("--max-positives", type=int, default=1_000, help="target-class images for the triplet term")
    parser.add_argument("--patch-size", type=int, default=recipe.patch_size)
    parser.add_argument("--epochs", type=int, default=recipe.epochs)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--lr", type=float, default=recipe.lr)
    parser.add_argument("--triplet-weight", type=float, default=recipe.triplet_weight)
    parser.add_argument("--triplet-margin", type=float, default=recipe.triplet_margin)
    parser.add_argument("--seed", type=int, default=recipe.seed)
    parser.add_argument("--device", default="cpu", help="torch device of the victim (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def optimize_trigger(args: argparse.Namespace, overrides: list[str]) -> int:
    import torch

    from clbd.badclip_trigger import CAPTIONS_FILE, PatchRecipe, gather_inputs, load_victim, model_geometry
    from clbd.badclip_trigger import optimize_patch as run_optimisation

    try:
        recipe = PatchRecipe(
            patch_size=args.patch_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            triplet_weight=args.triplet_weight,
            triplet_margin=args.triplet_margin,
            seed=args.seed,
        )
        if args.max_images < 1 or args.max_positives < 1:
            raise ValueError("--max-images and --max-positives must be >= 1")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device on this machine")
        victim, model_name = load_victim(args.checkpoint, args.model)
        side, width = model_geometry(victim)
        recipe.check(side)  # the patch fits the victim's images, before any data is read
        datamodule = load_datamodule(args.config, overrides, need_attack=False)
        if datamodule.modality != "image-text":
            raise ValueError("data: optimize-trigger needs a CLIP data config (data.class_path CLIPDataModule)")
        inputs, captions, info = gather_inputs(
            datamodule,
            args.target,
            model_name,
            max_images=args.max_images,
            max_positives=args.max_positives,
            captions=args.captions,
            caption_file=args.caption_file,
            reference_dir=args.reference_dir,
        )
        settings = {
            "checkpoint": str(Path(args.checkpoint).resolve()),
            "model_name": model_name,
            "image_size": side,
            "embedding_width": width,
            "target": args.target,
            "data": info,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / CAPTIONS_FILE).write_text("".join(caption.replace("\n", " ") + "\n" for caption in captions))
        result = run_optimisation(
            victim, inputs, recipe, args.out, settings=settings, progress=not args.no_progress, device=args.device
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"clbd poison optimize-trigger: error: {exc}", file=sys.stderr)
        return 2
    final, initial = result["final_loss"]["loss"], result["initial_loss"]["loss"]
    print(f"wrote {args.out / result['trigger']}: loss {initial:.4f} -> {final:.4f} over {recipe.epochs} epochs")
    return 0
