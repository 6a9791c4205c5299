"""What the benchmarks share: real data on disk, interleaved repeats, medians and spreads, the machine's description.

Every benchmark compares contenders SIDE BY SIDE in one run: the contenders of one repeat run back to back, their
order alternating between repeats, so that a noisy shared machine slows all of them alike; the verdict is the
median of the per-repeat ratios (paired), with the spread (min..max) printed beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import resource
import statistics
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ on the path, not the repository
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image  # noqa: E402

from datamodules.shards import ShardIndex, ShardSink, index_path_for, resolve_shards  # noqa: E402

SHARED_DATA = Path(os.environ.get("CLBD_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
if not SHARED_DATA.exists():  # worktrees live one level deeper than the main checkout
    SHARED_DATA = REPO_ROOT.parents[1] / "shared" / "data"
DEFAULT_CIFAR = SHARED_DATA / "cifar10-jpg.tar.gz"
DEFAULT_COCO = SHARED_DATA / "coco-mini.tar.gz"
DEFAULT_CACHE = Path(os.environ.get("CLBD_BENCH_CACHE", "/tmp/clbd-bench-cache"))


# ---- arguments and the machine ---------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per comparison")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_CIFAR,
        help="CIFAR-10 (cifar10-jpg.tar.gz or torchvision's python format); when absent, generated images are used",
    )
    parser.add_argument("--coco", type=Path, default=DEFAULT_COCO, help="coco-mini.tar.gz for the large-image runs")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where converted shards are kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return parser


def machine() -> dict[str, object]:
    """Cores, CPU model and load: what a reader needs to judge the numbers."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def load_at_end(info: dict[str, object]) -> None:
    """Record and print the load average after the run (the start's is in ``machine()``)."""
    info["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end: {info['load_avg_end']} (1/5/15 min)")


def print_machine(info: dict[str, object]) -> None:
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, load average {info['load_avg']} (1/5/15 min), "
        f"python {info['python']}, torch {info['torch']}, torch threads {info['torch_threads']}"
    )


# ---- data --------------------------------------------------------------------------------------------------------
def cifar_converted(source: Path, cache: Path) -> Path | None:
    """CIFAR-10 converted by ``datamodules.converters.cifar10.convert_cifar10`` once into the cache; None when absent."""
    if not source.exists():
        print(f"note: no CIFAR-10 at {source} (--data): using generated images instead", flush=True)
        return None
    stat = source.stat()
    target = cache / f"cifar10-{stat.st_size}-{int(stat.st_mtime)}"
    if index_path_for(target, "train").exists() and index_path_for(target, "test").exists():
        return target
    from datamodules.converters.cifar10 import convert_cifar10

    started = time.perf_counter()
    print(f"converting {source} to shards in {target} (once; later runs reuse it) ...", flush=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    convert_cifar10(source, tmp, overwrite=True, progress=False)
    _publish(tmp, target)
    print(f"  converted in {time.perf_counter() - started:.0f} s", flush=True)
    return target


def iter_samples(index: ShardIndex) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a shard set in order, read with tarfile (members of a key are adjacent)."""
    for shard in index.shards:
        with tarfile.open(shard.url, mode="r:") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isreg():
                    continue
                stem, _, ext = info.name.rpartition("/")[2].partition(".")
                name = info.name.rpartition("/")[0] + "/" + stem if "/" in info.name else stem
                if name != key and key is not None:
                    yield key, members
                    members = {}
                key = name
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield key, members


def _generated_image(rng: random.Random, size: tuple[int, int]) -> bytes:
    """A JPEG of smooth gradients and shapes (used only when no real dataset is at hand)."""
    from PIL import ImageDraw

    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(4, size[0]), y0 + rng.randrange(4, size[1])
        draw.ellipse((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_like_shards(args: argparse.Namespace, out: Path, *, n: int, shards: int, split: str = "train") -> Path:
    """``n`` CIFAR-10 samples (jpg, cls, txt "a photo of a <class>.") in ``shards`` shards; cached by size.

    Real CIFAR-10 from ``args.data`` when present (converted once with ``convert_cifar10``), else generated JPEGs.
    Returns the index file.
    """
    converted = cifar_converted(args.data, args.cache)
    origin = converted.name if converted else "generated"
    folder = out / f"{origin}-{split}-{n}-{shards}"
    index_file = index_path_for(folder, split)
    if index_file.exists():
        return index_file
    per_shard = -(-n // shards)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    with ShardSink(tmp, split, maxcount=per_shard, classes=CIFAR_CLASSES, overwrite=True) as sink:
        if converted is not None:
            source = resolve_shards(str(index_path_for(converted, split)))
            if source.total < n:
                raise ValueError(f"--data: the {split} split has {source.total} samples, {n} are needed")
            for i, (key, members) in enumerate(iter_samples(source)):
                if i >= n:
                    break
                label = int(members["cls"])
                sink.write(key, {"jpg": members["jpg"], "cls": label, "txt": f"a photo of a {CIFAR_CLASSES[label]}."})
        else:
            rng = random.Random(split)
            for i in range(n):
                label = i % 10
                sink.write(
                    f"{split}_{i:06d}",
                    {
                        "jpg": _generated_image(rng, (32, 32)),
                        "cls": label,
                        "txt": f"a photo of a {CIFAR_CLASSES[label]}.",
                    },
                )
    if len(sink.shards) != shards:
        raise ValueError(f"asked for {shards} shards of {n} samples, wrote {len(sink.shards)}")
    _publish(tmp, folder)
    # the index stores names relative to its folder, so the renamed folder stays valid
    return index_file


def _publish(tmp: Path, folder: Path) -> None:
    try:
        os.rename(tmp, folder)
    except OSError:  # another run published the same set first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def large_image_shards(
    args: argparse.Namespace, out: Path, *, n: int, shards: int, sides: tuple[int, int] = (256, 500)
) -> Path:
    """``n`` captioned JPEGs whose longer side is uniform in ``sides`` (for CLIP at 224 px).

    From the 159 real COCO photos of ``args.coco`` (each used several times, resized differently, with its own
    captions) when present, else generated. Returns the index file.
    """
    rng = random.Random(0)
    origin = "coco" if args.coco.exists() else "generated"
    if origin == "generated":
        print(f"note: no COCO photos at {args.coco} (--coco): using generated images instead", flush=True)
    folder = out / f"{origin}-{sides[0]}-{sides[1]}-{n}-{shards}"
    index_file = index_path_for(folder, "train")
    if index_file.exists():
        return index_file
    photos = _coco_photos(args.coco) if args.coco.exists() else []
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    with ShardSink(tmp, "train", maxcount=-(-n // shards), overwrite=True) as sink:
        for i in range(n):
            side = rng.randint(*sides)
            if photos:
                image, captions = photos[i % len(photos)]
                scale = side / max(image.size)
                resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
                buffer = io.BytesIO()
                resized.save(buffer, "JPEG", quality=90)
                data, caption = buffer.getvalue(), captions[(i // len(photos)) % len(captions)]
            else:
                data, caption = _generated_image(rng, (side, rng.randint(sides[0], side))), f"generated image {i}"
            sink.write(f"img{i:06d}", {"jpg": data, "txt": caption})
    _publish(tmp, folder)
    return index_file


def _coco_photos(path: Path) -> list[tuple[Image.Image, list[str]]]:
    with tarfile.open(path, mode="r:*") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isreg()}
        captions: dict[str, list[str]] = {}
        for name, member in members.items():
            if name.endswith(".json") and "captions_" in name:
                data = json.load(tar.extractfile(member))
                files = {img["id"]: img["file_name"] for img in data["images"]}
                for ann in data["annotations"]:
                    captions.setdefault(files[ann["image_id"]], []).append(ann["caption"].strip())
        photos = []
        for name in sorted(members):
            base = name.rpartition("/")[2]
            if base.endswith(".jpg") and base in captions:
                image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
                photos.append((image, captions[base]))
    if not photos:
        raise ValueError(f"--coco: {path} holds no captioned .jpg")
    return photos


# ---- measuring ---------------------------------------------------------------------------------------------------
def batch_size_of(batch: dict[str, Any]) -> int:
    if "views" in batch:
        return batch["views"][0].shape[0]
    return batch["image_u8" if "image_u8" in batch else "image"].shape[0]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (loader workers are joined at the end of a pass)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def one_pass(loader: Any) -> dict[str, float]:
    """One full pass over a loader (its workers start inside, as each epoch of a run does): samples per second of
    wall-clock time, and samples per CPU-second of all its processes (the work done; much less disturbed by other
    jobs on a shared machine than wall-clock time)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    samples = sum(batch_size_of(batch) for batch in loader)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"wall": samples / wall, "cpu": samples / cpu, "samples": samples}


# ---- comparing ---------------------------------------------------------------------------------------------------
@dataclass
class Series:
    """One contender's measurements (e.g. samples/s per repeat)."""

    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> str:
        return f"{min(self.values):.4g}..{max(self.values):.4g}"


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each contender once per repeat, alternating the order (AB, BA, AB, ...); their results per contender."""
    results: dict[str, list[Any]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(contenders[name]())
    return results


def paired_ratios(numerator: Series, denominator: Series) -> Series:
    return Series(f"{numerator.name}/{denominator.name}", [a / b for a, b in zip(numerator.values, denominator.values)])


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def verdict(ratio: float, goal: float) -> str:
    return f"MET (>= {goal})" if ratio >= goal else f"MISSED (goal >= {goal})"


def verdicts(result: dict[str, Any], goal: float) -> str:
    """Both readings of a ratio against its goal: CPU time (robust on a shared machine) and wall-clock time."""
    return " / ".join(
        f"{metric} {'MET' if result[metric]['ratio_median'] >= goal else 'MISSED'}" for metric in ("cpu", "wall")
    )


def write_json(path: Path | None, payload: dict[str, object]) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"results written to {path}")


__all__ = [
    "REPO_ROOT",
    "Series",
    "base_parser",
    "batch_size_of",
    "cpu_seconds",
    "cifar_like_shards",
    "interleaved",
    "large_image_shards",
    "load_at_end",
    "machine",
    "one_pass",
    "paired_ratios",
    "print_machine",
    "print_table",
    "verdict",
    "verdicts",
    "write_json",
]
