"""Shards read from their tars each epoch vs decoded once into memory (``data.resident``), on real CIFAR-10, same run.

Contenders: ``SimCLRDataModule(...).train_dataloader()`` over the same CIFAR-10 training shards, one full epoch per
repeat, one loader process (the per-core rate; a GPU run multiplies it by its loader processes):

* ``tars``: today's stream (tar reading + JPEG decoding every epoch);
* ``resident``: the same stream served from memory (decoded once, before the first epoch; that one-time cost and the
  memory it takes are printed apart).

Both with the views made in the loaders (the CPU path) and with only the views' parameters drawn there
(``views_on_device``, the GPU config's loader work), and for the monitors' evaluation pass (kNN bank of training
images + test images with the NA trigger and its control, eval transform), which reads every shard set each epoch.

Reported: samples/s (wall and CPU-time clocks), the paired ratio resident/tars (median and spread).
Run: ``python benchmarks/resident_data.py`` (``--quick``: 4096 training images, 3 repeats).
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
    interleaved,
    load_at_end,
    machine,
    one_pass,
    paired_ratios,
    print_machine,
    print_table,
    write_json,
)
from datamodules import SimCLRDataModule  # noqa: E402
from poisoning import NoisyAlignment  # noqa: E402


def data_module(train: Path, test: Path, *, resident: bool, views_on_device: bool, bank: int) -> SimCLRDataModule:
    dm = SimCLRDataModule(
        train_shards=str(train),
        val_shards=str(test),
        batch_size=512,
        eval_batch_size=512,
        num_workers=1,
        knn_bank_size=bank,
        views_on_device=views_on_device,
        resident=resident,
        attack=NoisyAlignment(target_class=0, rate=0.05, reference_pool_size=50),
        poison_train=False,  # the evaluation still carries NA's trigger and control; training data are the same
    )
    dm.setup("fit")
    return dm


def eval_pass(dm: SimCLRDataModule) -> dict[str, float]:
    """The monitors' reading of one epoch: the kNN bank, then the test images (clean, triggered, control)."""
    bank, test = dm.val_dataloader()
    first, second = one_pass(bank), one_pass(test)
    samples = first["samples"] + second["samples"]
    wall = first["samples"] / first["wall"] + second["samples"] / second["wall"]
    cpu = first["samples"] / first["cpu"] + second["samples"] / second["cpu"]
    return {"wall": samples / wall, "cpu": samples / cpu, "samples": samples}


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="training images (default 4096 quick / 20000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.images or (4096 if args.quick else 20000)
    repeats = args.repeats or (3 if args.quick else 5)
    info = machine()
    print_machine(info)
    train = cifar_like_shards(args, args.cache / "resident", n=n, shards=8)
    test = cifar_like_shards(args, args.cache / "resident", n=max(n // 5, 512), shards=2, split="test")

    modules, build, megabytes = {}, {}, 0.0
    for resident in (False, True):
        for on_device in (False, True):
            dm = data_module(train, test, resident=resident, views_on_device=on_device, bank=n)
            if resident:
                started = time.perf_counter()
                held = [dm.resident_shards(dm.index(split), split) for split in ("train", "val")]
                build[on_device] = time.perf_counter() - started
                megabytes = sum(shard_set.nbytes for shard_set in held) / 2**20
            modules[(resident, on_device)] = dm

    cases = {
        "train, views in the loader": lambda resident: one_pass(modules[(resident, False)].train_dataloader()),
        "train, view parameters only (views_on_device)": lambda resident: one_pass(
            modules[(resident, True)].train_dataloader()
        ),
        "evaluation (kNN bank + test with NA trigger, control)": lambda resident: eval_pass(modules[(resident, False)]),
    }
    result = {"machine": info, "images": n, "repeats": repeats, "build_s": build[False], "resident_mb": megabytes}
    rows = []
    for label, run in cases.items():
        runs = interleaved({"tars": lambda run=run: run(False), "resident": lambda run=run: run(True)}, repeats)
        result[label] = runs
        for metric in ("cpu", "wall"):
            tars = Series("tars", [r[metric] for r in runs["tars"]])
            resident = Series("resident", [r[metric] for r in runs["resident"]])
            ratio = paired_ratios(resident, tars)
            result[label][f"{metric}_ratio"] = ratio.values
            rows.append(
                [
                    label,
                    metric,
                    f"{tars.median:.0f} ({tars.spread()})",
                    f"{resident.median:.0f} ({resident.spread()})",
                    f"{ratio.median:.2f} ({ratio.spread()})",
                ]
            )
    print(
        f"\nCIFAR-10: {n} training images in 8 shards, 1 loader process, {repeats} interleaved repeats; samples/s.\n"
        f"Resident: {megabytes:.0f} MB of decoded images, read and decoded in {build[False]:.1f} s once per run."
    )
    print_table(["stream", "clock", "tars (today)", "resident", "resident / tars"], rows)
    load_at_end(info)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
