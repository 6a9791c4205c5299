"""``clbd poison``: look at an attack without training — its manifest, a picture of its samples, its geometry.

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

from datamodules import ShardDataModule
from datamodules.catalog import load_raw_samples
from datamodules.decode import decode_sample
from datamodules.faults import FaultCounter


def load_datamodule(config_files: list[str], overrides: list[str]) -> ShardDataModule:
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


def preview(datamodule: ShardDataModule, out: Path, count: int, overwrite: bool) -> int:
    """A grid: original, poisoned, and what the model sees (SimCLR's two views / CLIP's image and caption)."""
    from poisoning.preview import render_grid

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    plan = datamodule.build_plan()
    keys = [record.key for record in plan.records()[:count]]
    if not keys:
        raise ValueError("the attack poisons no sample of these shards (rate/count too small?)")
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
            title = f"{key}  {record.attack}  {record.arrangement or ''}".strip()
        else:
            title = f"{key}  {record.attack}: '{sample['text']}' -> '{poisoned['text']}'"
        rows.append({"title": title, "images": images, "labels": labels})
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(rows, str(out))
    return len(rows)


def main(argv: list[str]) -> int:
    top = argparse.ArgumentParser(prog="clbd poison", description=__doc__)
    commands = top.add_subparsers(dest="command", required=True)
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
    geometry = commands.add_parser("geometry", help="Monte-Carlo view geometry of NA vs baselines (docs table)")
    geometry.add_argument("rest", nargs=argparse.REMAINDER)
    args, extra = top.parse_known_args(argv)
    if args.command == "geometry":
        from poisoning.geometry import main as geometry_main

        return geometry_main(args.rest + extra)
    try:
        datamodule = load_datamodule(args.config, extra)
        if args.command == "manifest":
            summary = write_manifest(datamodule, args.out, args.overwrite)
            print(f"wrote {args.out}: {summary}")
        else:
            shown = preview(datamodule, args.out, args.count, args.overwrite)
            print(f"wrote {args.out}: {shown} poisoned samples")
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"clbd poison {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
