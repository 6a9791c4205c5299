"""``clbd data ...``: convert datasets to shards, index img2dataset output, generate the synthetic default, inspect.

Run as ``clbd data SUBCOMMAND ...`` or ``python -m clbd.data SUBCOMMAND ...``. Every converting
subcommand ends with a summary table (written, skipped per reason, converted); errors a user can fix (missing
path, existing output without --overwrite, unreadable annotations) print one line naming the path and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datamodules import synthetic
from datamodules.converters.cifar10 import convert_cifar10
from datamodules.converters.coco import convert_coco_captions
from datamodules.converters.csv_captions import convert_csv
from datamodules.converters.image_folder import convert_image_folder
from datamodules.converters.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from datamodules.converters.img2dataset import index_img2dataset
from datamodules.converters.writer import DEFAULT_MAXCOUNT, iter_index_files
from datamodules.shards import INDEX_SUFFIX, ShardIndex, ShardSpecError, resolve_shards

PROG = "clbd data"
EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser, *, images: bool = True, maxcount: bool = True) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing shard set of the same prefix (default: refuse and exit 2)",
    )
    if maxcount:
        group.add_argument(
            "--maxcount",
            type=_positive_int,
            default=DEFAULT_MAXCOUNT,
            metavar="N",
            help="samples per shard (default: %(default)s)",
        )
    if images:
        checks = parser.add_argument_group("image checks")
        checks.add_argument(
            "--min-side",
            type=_positive_int,
            default=DEFAULT_MIN_SIDE,
            metavar="PX",
            help="skip images whose shorter side is below PX pixels (default: %(default)s)",
        )
        checks.add_argument(
            "--max-pixels",
            type=_positive_int,
            default=DEFAULT_MAX_PIXELS,
            metavar="N",
            help="skip images with more than N pixels, read from the header before decoding "
            "(decompression-bomb guard; default: %(default)s, as the training stream)",
        )
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument("--report", type=Path, metavar="FILE", help="also write the report as JSON to FILE")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Prepare datasets as clbd shard sets: OUT/{prefix}-NNNNNN.tar + OUT/{prefix}.index.json. "
        "Samples hold key.jpg|png (image), key.cls (class index), key.txt (caption), key.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  clbd data cifar10 --src cifar-10-python.tar.gz --out data/cifar10\n"
        "  clbd data folder --src imagenette/train --out data/imagenette --prefix train\n"
        "  clbd data coco --images val2017 --annotations captions_val2017.json --out data/coco --prefix val\n"
        "  clbd data csv --csv captions.csv --out data/mine --prefix train\n"
        "  clbd data img2dataset --src cc3m_shards\n"
        "  clbd data synthetic --out data/shapes\n"
        "  clbd data info data/cifar10",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "cifar10",
        help="CIFAR-10 (torchvision's python batches or train/<class>/*.jpg folders)",
        description="Convert CIFAR-10 to OUT/train-*.tar and OUT/test-*.tar. SRC is torchvision's "
        "cifar-10-batches-py folder or cifar-10-python.tar.gz (images stored as lossless "
        "PNG), or folders train/<class>/*.jpg and test/<class>/*.jpg as a folder or a "
        "tar archive, read without unpacking (JPEG bytes kept). Labels follow CIFAR-10's "
        "official class order.",
    )
    p.add_argument("--src", type=Path, required=True, metavar="PATH", help="CIFAR-10 folder or archive")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep image folders in sorted path order (default: a fixed seeded order, so shards mix classes)",
    )
    _common(p)

    p = sub.add_parser(
        "folder",
        help="an image folder with one sub-folder per class",
        description="Convert SRC/<class>/**/*.jpg|png|... (a folder or a tar archive) into the shard "
        "set OUT/PREFIX-*.tar. Class indices are the sorted folder names unless --classes "
        "gives the order (use the train split's order for val/test).",
    )
    p.add_argument("--src", type=Path, required=True, metavar="PATH", help="folder or tar archive of class folders")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--prefix", default="train", help="shard set name, e.g. train or val (default: %(default)s)")
    p.add_argument("--subdir", metavar="DIR", help="folder inside SRC that holds the class folders (e.g. train)")
    p.add_argument("--classes", metavar="A,B,...", help="class names in index order, comma-separated")
    p.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep sorted path order (default: a fixed seeded order, so shards mix classes)",
    )
    _common(p)

    p = sub.add_parser(
        "coco",
        help="COCO-style captions JSON + image folder",
        description="Convert a COCO captions file (images[] with id/file_name, annotations[] with "
        "image_id/caption) into OUT/PREFIX-*.tar with key.txt (caption) and key.json "
        "(image id, file name, all captions).",
    )
    p.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder the file_name entries are in")
    p.add_argument("--annotations", type=Path, required=True, metavar="JSON", help="captions_*.json")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--prefix", default="train", help="shard set name (default: %(default)s)")
    p.add_argument(
        "--captions",
        choices=("first", "all"),
        default="first",
        help="first: one sample per image with its first caption; all: one sample per caption, keys "
        "KEY_0, KEY_1, ... (default: %(default)s)",
    )
    _common(p)

    p = sub.add_parser(
        "csv",
        help="a CSV with header filepath,caption",
        description="Convert a CSV (or .tsv) with header 'filepath,caption' into OUT/PREFIX-*.tar, one "
        "sample per row. Relative paths are resolved against --root (default: the CSV's "
        "folder). Missing files and empty captions are skipped and counted.",
    )
    p.add_argument("--csv", type=Path, required=True, metavar="FILE", help="the CSV file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--prefix", default="train", help="shard set name (default: %(default)s)")
    p.add_argument("--root", type=Path, metavar="DIR", help="folder relative file paths start from")
    p.add_argument("--delimiter", metavar="C", help="field separator (default: tab for .tsv, else comma)")
    _common(p)

    p = sub.add_parser(
        "img2dataset",
        help="validate img2dataset webdataset output and index it in place",
        description="Check img2dataset shards (00000.tar ... with key.jpg, key.txt, key.json and "
        "00000_stats.json) by reading their tar headers, compare the counts with the stats "
        "files, and write SRC/PREFIX.index.json beside them. No shard is rewritten.",
    )
    p.add_argument("--src", type=Path, required=True, metavar="DIR", help="img2dataset output folder")
    p.add_argument("--prefix", default="train", help="name of the index file (default: %(default)s)")
    p.add_argument(
        "--trust-stats",
        action="store_true",
        help="take each shard's count from its _stats.json 'successes' without reading the tar "
        "(fast on network file systems; nothing is validated)",
    )
    _common(p, images=False, maxcount=False)

    defaults = synthetic.DEFAULT_SIZES
    p = sub.add_parser(
        "synthetic",
        help="generate the embedded shapes dataset (the default for the main job)",
        description="Generate procedural images of 10 shape classes (colour independent of class) "
        "with true captions, as OUT/train|val|test-*.tar (png, cls, txt, json). The same "
        "seed and sizes give byte-identical shards.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--n-train", type=_count, default=defaults["train"], metavar="N", help="train images (default: %(default)s)"
    )
    p.add_argument(
        "--n-val", type=_count, default=defaults["val"], metavar="N", help="val images (default: %(default)s)"
    )
    p.add_argument(
        "--n-test", type=_count, default=defaults["test"], metavar="N", help="test images (default: %(default)s)"
    )
    p.add_argument(
        "--image-size",
        type=_positive_int,
        default=synthetic.DEFAULT_IMAGE_SIZE,
        metavar="PX",
        help="image side in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--preview", type=Path, metavar="PNG", help="also save a grid of examples (one row per class) to PNG"
    )
    _common(p, images=False)

    p = sub.add_parser(
        "info",
        help="summarise a shard set (shards, samples, classes)",
        description="Print what the index of a shard set says: shards, samples, fields, source, "
        "samples per class. PATH is an index file, a folder (every index in it), a tar, "
        "or a brace pattern of tars (counted from headers when there is no index).",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


# ----------------------------------------------------------------------------------------------------------------


def _image_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "overwrite": args.overwrite,
        "maxcount": args.maxcount,
        "min_side": args.min_side,
        "max_pixels": args.max_pixels,
        "progress": not args.quiet,
    }


def _run_cifar10(args: argparse.Namespace) -> dict[str, Any]:
    return convert_cifar10(args.src, args.out, shuffle_seed=None if args.no_shuffle else 0, **_image_options(args))


def _run_folder(args: argparse.Namespace) -> dict[str, Any]:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    return convert_image_folder(
        args.src,
        args.out,
        prefix=args.prefix,
        subdir=args.subdir,
        classes=classes,
        shuffle_seed=None if args.no_shuffle else 0,
        **_image_options(args),
    )


def _run_coco(args: argparse.Namespace) -> dict[str, Any]:
    return convert_coco_captions(
        args.images, args.annotations, args.out, prefix=args.prefix, captions=args.captions, **_image_options(args)
    )


def _run_csv(args: argparse.Namespace) -> dict[str, Any]:
    delimiter = args.delimiter.encode().decode("unicode_escape") if args.delimiter else None  # allow "\t"
    return convert_csv(
        args.csv, args.out, prefix=args.prefix, root=args.root, delimiter=delimiter, **_image_options(args)
    )


def _run_img2dataset(args: argparse.Namespace) -> dict[str, Any]:
    return index_img2dataset(
        args.src, prefix=args.prefix, trust_stats=args.trust_stats, overwrite=args.overwrite, progress=not args.quiet
    )


def _run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    report = synthetic.generate_shapes(
        args.out,
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        image_size=args.image_size,
        maxcount=args.maxcount,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if args.preview:
        args.preview.parent.mkdir(parents=True, exist_ok=True)
        synthetic.render_grid(seed=args.seed, image_size=args.image_size).save(args.preview)
        report["preview"] = str(args.preview)
    return report


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "cifar10": _run_cifar10,
    "folder": _run_folder,
    "coco": _run_coco,
    "csv": _run_csv,
    "img2dataset": _run_img2dataset,
    "synthetic": _run_synthetic,
}


def format_report(report: dict[str, Any]) -> str:
    """A short table: one row per split, written, shards, then every skip and conversion reason that occurred."""
    splits = report["splits"]
    skip_kinds = sorted({k for s in splits.values() for k in s["skipped"]})
    conv_kinds = sorted({k for s in splits.values() for k in s["converted"]})
    header = ["split", "written", "shards", "skipped", *(f"skip:{k}" for k in skip_kinds), *conv_kinds]
    rows = [header]
    for name, s in splits.items():
        rows.append(
            [
                name,
                s["written"],
                s["shards"],
                sum(s["skipped"].values()),
                *(s["skipped"].get(k, 0) for k in skip_kinds),
                *(s["converted"].get(k, 0) for k in conv_kinds),
            ]
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(
        0, f"{report['converter']}: {report['written']} samples in {report['out']} ({report['seconds']:.1f} s)"
    )
    for name, s in splits.items():
        for item in s.get("stats_mismatches", []):
            lines.append(
                f"  {name}: {item['shard']}: {item['scanned']} samples in the tar, "
                f"{item['stats_successes']} in its stats file"
            )
        for item in s.get("unreadable_shards", []):
            lines.append(f"  {name}: {item['shard']} left out of the index: {item['error']}")
        if s.get("index"):
            lines.append(f"  index: {s['index']}")
    return "\n".join(lines)


def summarize_index(path: str) -> list[dict[str, Any]]:
    """One summary per shard set at ``path`` (an index, a folder of indexes, tars or a pattern)."""
    target = Path(path)
    files = list(iter_index_files(target)) if target.is_dir() or path.endswith(INDEX_SUFFIX) else []
    indexes = [(str(f), ShardIndex.load(f)) for f in files]
    if not indexes:
        indexes = [(path, resolve_shards(path, name="info"))]
    summaries = []
    for where, index in indexes:
        per_class = None
        if index.classes is not None and index.class_counts is not None:
            per_class = dict(zip(index.classes, index.class_counts))
        summaries.append(
            {
                "path": where,
                "shards": len(index.shards),
                "total": index.total,
                "counted_from": index.counted_from,
                "fields": index.fields,
                "classes": index.classes,
                "per_class": per_class,
                "source": index.source,
                "created": index.created,
            }
        )
    return summaries


def format_summary(summary: dict[str, Any]) -> str:
    source = summary["source"] or {}
    origin = source.get("path") or source.get("annotations") or ""
    lines = [
        summary["path"],
        f"  shards: {summary['shards']}   samples: {summary['total']}"
        + ("   (counted from tar headers: no index)" if summary["counted_from"] == "scan" else ""),
        f"  fields: {', '.join(summary['fields']) or '-'}",
    ]
    if source:
        lines.append(f"  source: {source.get('converter', '?')}" + (f" ({origin})" if origin else ""))
    if summary["classes"] is not None:
        counts = summary["per_class"] or {}
        lines.append(
            f"  classes: {len(summary['classes'])}"
            + ("" if counts else " (no per-class counts for a selection of shards)")
        )
        width = max((len(c) for c in summary["classes"]), default=0)
        for i, name in enumerate(summary["classes"]):
            lines.append(f"    {i:>4}  {name.ljust(width)}  {counts.get(name, '')}".rstrip())
    return "\n".join(lines)


def _run_info(args: argparse.Namespace) -> int:
    summaries = summarize_index(args.path)
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print("\n".join(format_summary(s) for s in summaries))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``clbd data``; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return int(exc.code or 0)
    try:
        if args.command == "info":
            return _run_info(args)
        report = RUNNERS[args.command](args)
        print(format_report(report))
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=1) + "\n")
        return 0
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ShardSpecError, ValueError) as exc:
        print(f"{PROG} {args.command}: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


def _message(exc: BaseException) -> str:
    # OSErrors raised by the OS (not by us) carry errno + filename; say it as one line naming the path
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
