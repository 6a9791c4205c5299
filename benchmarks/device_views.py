"""Images made by the batched device path run on the CPU vs today's per-sample path, on real images, same run.

SimCLR (``data.views_on_device``), the same CIFAR-10 JPEG bytes to the same two normalised 32 px views per image:

* per-sample (``views.SimCLRViews``, what the loaders do today): decode, then torchvision's v2 pipeline twice;
* device path: decode + uint8 tensor + the two views' parameters per sample (what the loaders do then), collate,
  then ``DeviceViews`` on the whole batch (here on the CPU; on a GPU it runs there).

CLIP (``data.images_on_device``), 224 px (ViT-B-32's preprocess) from real photos of 256-500 px (COCO, resized):

* per-sample (``views.CLIPPreprocess``): decode, then open_clip's train transform (PIL bicubic resized crop);
* device path: decode + uint8 tensor + the crop per sample, collate (padded to the batch's largest image), then
  ``DeviceCLIPImages`` on the whole batch.

Reported per case: images/s of each (wall and CPU time, 1 torch thread, interleaved repeats) and the ratio
device/per-sample, plus the device path's two parts alone (the per-sample part a loader keeps; the batch transform).
On a GPU the batch transform leaves the loaders, so the loaders' rate is the "loader part" column.

Run: ``python benchmarks/device_views.py`` (``--quick``: 1024 CIFAR-10 images, 256 photos, 3 repeats).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Series,
    base_parser,
    cifar_like_shards,
    cpu_seconds,
    interleaved,
    iter_samples,
    large_image_shards,
    load_at_end,
    machine,
    paired_ratios,
    print_machine,
    print_table,
    write_json,
)
from datamodules.decode import decode_image  # noqa: E402
from datamodules.device_clip import DeviceCLIPImagesHook  # noqa: E402
from datamodules.device_views import DeviceViewsHook  # noqa: E402
from datamodules.faults import FaultCounter  # noqa: E402
from datamodules.shards import resolve_shards  # noqa: E402
from datamodules.stream import default_collate  # noqa: E402
from datamodules.views import CLIPPreprocess, SimCLRAugmentation, SimCLRViews  # noqa: E402


def timed(fn) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = fn()
    return {"wall": n / (time.perf_counter() - wall), "cpu": n / max(cpu_seconds() - cpu, 1e-9)}


def compare(label: str, samples: list, per_sample, hook, make, batch: int, repeats: int) -> tuple[dict[str, Any], list]:
    """Both paths over the same (key, JPEG bytes): ``per_sample(image, key)`` makes the images of one sample today;
    the device path is ``hook.item`` per sample (the loader part), ``hook.collate``, then ``make`` on the batch."""
    faults = FaultCounter()
    collate = hook.collate(default_collate)

    def decoded():
        return [(key, decode_image(data, faults, key)) for key, data in samples]

    def run_per_sample() -> int:
        for key, image in decoded():
            per_sample(image, key)
        return len(samples)

    def loader_part() -> list:
        return [hook.item({"image": image, "__key__": key, "label": 0}, 0) for key, image in decoded()]

    def run_device() -> int:
        items = loader_part()
        for start in range(0, len(items), batch):
            make(collate(items[start : start + batch]))
        return len(items)

    def run_loader_part() -> int:
        return len(loader_part())

    items = loader_part()
    batches = [collate(items[s : s + batch]) for s in range(0, len(items), batch)]

    def run_transform() -> int:
        for made in batches:
            make(dict(made))
        return len(items)

    runs = interleaved(
        {
            "per_sample": lambda: timed(run_per_sample),
            "device_path": lambda: timed(run_device),
            "loader_part": lambda: timed(run_loader_part),
            "batch_transform": lambda: timed(run_transform),
        },
        repeats,
    )
    result: dict[str, Any] = {"case": label, "images": len(samples), "batch": batch, "runs": runs}
    rows = []
    for metric in ("wall", "cpu"):
        series = {name: Series(name, [r[metric] for r in values]) for name, values in runs.items()}
        ratio = paired_ratios(series["device_path"], series["per_sample"])
        loader_ratio = paired_ratios(series["loader_part"], series["per_sample"])
        result[f"{metric}_ratio"] = ratio.values
        result[f"{metric}_loader_ratio"] = loader_ratio.values
        rows.append(
            [
                label,
                metric,
                f"{series['per_sample'].median:.0f} ({series['per_sample'].spread()})",
                f"{series['device_path'].median:.0f} ({series['device_path'].spread()})",
                f"{ratio.median:.2f} ({ratio.spread()})",
                f"{series['loader_part'].median:.0f} ({loader_ratio.median:.2f}x)",
                f"{series['batch_transform'].median:.0f}",
            ]
        )
    print(f"  {label}: device/per-sample {rows[0][4]} wall, {rows[1][4]} CPU", flush=True)
    return result, rows


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="CIFAR-10 images per pass (default 1024 quick / 4096)")
    parser.add_argument("--photos", type=int, default=None, help="photos per pass for CLIP (default 256 quick / 1024)")
    parser.add_argument("--batch", type=int, default=512, help="batch of SimCLR's device transform")
    parser.add_argument("--clip-batch", type=int, default=64, help="batch of CLIP's device transform")
    parser.add_argument("--skip", nargs="*", default=[], choices=["simclr", "clip"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine()
    print_machine(info)
    result: dict[str, Any] = {"machine": info, "repeats": repeats, "cases": []}
    rows: list = []
    if "simclr" not in args.skip:
        n = args.images or (1024 if args.quick else 4096)
        index_file = cifar_like_shards(args, args.cache / "device_views", n=n, shards=1)
        samples = [(key, members["jpg"]) for key, members in iter_samples(resolve_shards(str(index_file)))]
        views = SimCLRViews(SimCLRAugmentation(image_size=32), seed=0)
        hook = DeviceViewsHook(SimCLRAugmentation(image_size=32), seed=0)
        label = f"SimCLR 32 px, {n} CIFAR-10 images, 2 views"
        case, case_rows = compare(
            label, samples, lambda image, key: views(image, key, 0), hook, hook.finish, args.batch, repeats
        )
        result["cases"].append(case)
        rows += case_rows
    if "clip" not in args.skip:
        n = args.photos or (256 if args.quick else 1024)
        index_file = large_image_shards(args, args.cache / "device_views", n=n, shards=1)
        samples = [(key, members["jpg"]) for key, members in iter_samples(resolve_shards(str(index_file)))]
        preprocess = CLIPPreprocess("ViT-B-32", train=True, seed=0)
        hook = DeviceCLIPImagesHook(preprocess)
        label = f"CLIP 224 px, {n} photos 256-500 px"

        def clip_per_sample(image, key):
            return preprocess.image(image, key, 0)

        case, case_rows = compare(label, samples, clip_per_sample, hook, hook.finish, args.clip_batch, repeats)
        result["cases"].append(case)
        rows += case_rows
    print(f"\n1 torch thread, {repeats} interleaved repeats; images/s (every column but the last includes the decode):")
    print_table(
        [
            "case",
            "clock",
            "per-sample (today)",
            "device path on CPU",
            "ratio",
            "loader part alone",
            "batch transform alone",
        ],
        rows,
    )
    load_at_end(info)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
