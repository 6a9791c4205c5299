"""SimCLR views: today's per-sample CPU path vs the device path run on the CPU, on real CIFAR-10 JPEGs, same run.

Both contenders start from the same JPEG bytes and end with the same two normalised 32 px views per image:

* per-sample (``views.SimCLRViews``, what the loaders do today): decode, then torchvision's v2 pipeline twice;
* device path (``data.views_on_device``): decode + uint8 tensor + the two views' parameters per sample (what the
  loaders do then), collate, then ``DeviceViews`` on the whole batch (here on the CPU; on a GPU it runs there).

Reported: images/s of each (wall and CPU time, 1 torch thread, interleaved repeats) and the ratio device/per-sample,
plus the device path's two parts alone (the per-sample part a loader keeps; the batch transform). On a GPU the
batch transform leaves the loaders, so the loaders' rate is the "loader part" column.

Run: ``python benchmarks/device_views.py`` (``--quick``: 1024 images, 3 repeats).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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
    load_at_end,
    machine,
    paired_ratios,
    print_machine,
    print_table,
    write_json,
)
from datamodules.decode import decode_image  # noqa: E402
from datamodules.device_views import DeviceViewsHook  # noqa: E402
from datamodules.faults import FaultCounter  # noqa: E402
from datamodules.shards import resolve_shards  # noqa: E402
from datamodules.stream import default_collate  # noqa: E402
from datamodules.views import SimCLRAugmentation, SimCLRViews  # noqa: E402


def timed(fn) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    n = fn()
    return {"wall": n / (time.perf_counter() - wall), "cpu": n / max(cpu_seconds() - cpu, 1e-9)}


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="images per pass (default 1024 quick / 4096)")
    parser.add_argument("--batch", type=int, default=512, help="batch of the device transform")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.images or (1024 if args.quick else 4096)
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine()
    print_machine(info)
    index_file = cifar_like_shards(args, args.cache / "device_views", n=n, shards=1)
    samples = [(key, members["jpg"]) for key, members in iter_samples(resolve_shards(str(index_file)))]
    augmentation = SimCLRAugmentation(image_size=32)
    per_sample = SimCLRViews(augmentation, seed=0)
    hook = DeviceViewsHook(augmentation, seed=0)
    collate = hook.collate(default_collate)
    faults = FaultCounter()

    def decoded():
        return [(key, decode_image(data, faults, key)) for key, data in samples]

    def run_per_sample() -> int:
        for key, image in decoded():
            per_sample(image, key, 0)
        return len(samples)

    def loader_part() -> list:
        return [hook.item({"image": image, "__key__": key, "label": 0}, 0) for key, image in decoded()]

    def run_device() -> int:
        items = loader_part()
        for start in range(0, len(items), args.batch):
            hook.views(collate(items[start : start + args.batch]))
        return len(items)

    def run_loader_part() -> int:
        return len(loader_part())

    items = loader_part()
    batches = [collate(items[s : s + args.batch]) for s in range(0, len(items), args.batch)]

    def run_transform() -> int:
        for batch in batches:
            hook.views(dict(batch))
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
    rows, result = [], {"machine": info, "images": n, "repeats": repeats, "runs": runs}
    for metric in ("wall", "cpu"):
        series = {name: Series(name, [r[metric] for r in values]) for name, values in runs.items()}
        ratio = paired_ratios(series["device_path"], series["per_sample"])
        loader_ratio = paired_ratios(series["loader_part"], series["per_sample"])
        result[f"{metric}_ratio"] = ratio.values
        result[f"{metric}_loader_ratio"] = loader_ratio.values
        rows.append(
            [
                metric,
                f"{series['per_sample'].median:.0f} ({series['per_sample'].spread()})",
                f"{series['device_path'].median:.0f} ({series['device_path'].spread()})",
                f"{ratio.median:.2f} ({ratio.spread()})",
                f"{series['loader_part'].median:.0f} ({loader_ratio.median:.2f}x)",
                f"{series['batch_transform'].median:.0f}",
            ]
        )
    print(f"\n{n} CIFAR-10 images (decode + 2 views each), 1 torch thread, {repeats} interleaved repeats; images/s:")
    print_table(
        ["clock", "per-sample (today)", "device path on CPU", "ratio", "loader part alone", "batch transform alone"],
        rows,
    )
    load_at_end(info)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
