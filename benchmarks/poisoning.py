"""Throughput of the poisoned training pipeline as a ratio to the clean one: same shards, same workers, interleaved.

Contenders (each one full pass of ``train_dataloader()``, the plan built beforehand, as ``setup("fit")`` does):

* ``clean``: the data module without an attack (the stream still runs its clean poison stage, marking samples);
* SimCLR: Noisy Alignment (``poisoning.NoisyAlignment``, target class 0 "airplane", the 1000 CIFAR-10 test airplanes
  as the reference pool via ``reference_shards``, so the training stream holds exactly the same samples as the clean
  one) at rate 1% and at 100%: each poisoned sample becomes a 32x64 canvas (reference + shadow + trigger) before
  its two views are cropped from it;
* CLIP: BadNet (``poisoning.BadNet``, target "banana") at 1% and 100%: the image framed to the model's square and a
  noise patch pasted, the caption replaced by a target caption.

Goals: poisoned/clean >= 0.97 at 1%, >= 0.7 at 100%.

Run: ``python benchmarks/poisoning.py [--quick]``.
"""

from __future__ import annotations

import itertools
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
    cifar_converted,
    cifar_like_shards,
    interleaved,
    large_image_shards,
    load_at_end,
    machine,
    one_pass,
    paired_ratios,
    print_machine,
    print_table,
    verdict,
    verdicts,
    write_json,
)
from datamodules import CLIPDataModule, SimCLRDataModule  # noqa: E402
from datamodules.shards import index_path_for  # noqa: E402
from poisoning import BadNet, NoisyAlignment  # noqa: E402

GOALS = {0.01: 0.97, 1.0: 0.7}


def reference_shards(args, out: Path) -> str:
    """Labelled shards holding the attacker's target-class references, apart from the training shards."""
    converted = cifar_converted(args.data, args.cache)
    if converted is not None:
        return str(index_path_for(converted, "test"))
    return str(cifar_like_shards(args, out, n=1000, shards=1, split="test"))


def simclr_modules(index_file: Path, references: str, batch: int, workers: int) -> dict[str, SimCLRDataModule]:
    common = dict(train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=workers)
    modules = {"clean": SimCLRDataModule(**common)}
    for rate in GOALS:
        attack = NoisyAlignment(target_class=0, rate=rate, reference_pool_size=None)
        modules[f"NA {rate:.0%}"] = SimCLRDataModule(attack=attack, reference_shards=references, **common)
    return modules


def clip_modules(index_file: Path, model_name: str, batch: int, workers: int) -> dict[str, CLIPDataModule]:
    common = dict(
        train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=workers, model_name=model_name
    )
    modules = {"clean": CLIPDataModule(**common)}
    for rate in GOALS:
        modules[f"BadNet {rate:.0%}"] = CLIPDataModule(attack=BadNet(target_class="banana", rate=rate), **common)
    return modules


def compare(label: str, modules: dict[str, Any], repeats: int, workers: int) -> list[dict[str, Any]]:
    loaders = {}
    for name, module in modules.items():
        module.setup("fit")  # validates the attack and builds its plan (no trainer: no manifest is written)
        loaders[name] = module.train_dataloader()
    plans = {name: module.plan.summary() for name, module in modules.items() if module.plan is not None}
    for loader in loaders.values():  # warm-up: page cache, lazy imports
        for _, _ in zip(range(2), loader):
            pass
    runs = interleaved({name: (lambda loader=loader: one_pass(loader)) for name, loader in loaders.items()}, repeats)
    results = []
    clean_names = [n for n in modules if n == "clean"]
    for name in modules:
        if name in clean_names:
            continue
        rate = next(r for r in GOALS if name.endswith(f"{r:.0%}"))
        result: dict[str, Any] = {
            "case": label,
            "attack": name,
            "workers": workers,
            "poisoned_keys": plans[name]["poisoned"],
            "catalog": plans[name]["catalog"],
        }
        row: list[object] = [label, name, workers, f"{plans[name]['poisoned']}/{plans[name]['catalog']}"]
        for metric in ("wall", "cpu"):
            clean = Series("clean", [run[metric] for run in runs["clean"]])
            poisoned = Series(name, [run[metric] for run in runs[name]])
            ratio = paired_ratios(poisoned, clean)
            result[metric] = {
                "clean": clean.values,
                "poisoned": poisoned.values,
                "ratio": ratio.values,
                "ratio_median": ratio.median,
            }
            row += [
                f"{clean.median:.0f} ({clean.spread()})",
                f"{poisoned.median:.0f} ({poisoned.spread()})",
                f"**{ratio.median:.3f}** ({ratio.spread()})",
            ]
        result["goal"] = GOALS[rate]
        row.append(f"{verdicts(result, GOALS[rate])} (goal >= {GOALS[rate]})")
        result["row"] = row
        results.append(result)
        print(
            f"  {label}, {name}, {workers} workers: poisoned/clean wall {result['wall']['ratio_median']:.3f}, "
            f"CPU {result['cpu']['ratio_median']:.3f}",
            flush=True,
        )
    return results


# ---- per-sample cost: the poisoned item against the clean one, in one process ---------------------------------------
def per_sample_costs(label: str, modules: dict[str, Any], n: int, repeats: int) -> dict[str, Any]:
    """CPU microseconds per sample of decode -> poison stage -> item, every sample poisoned (the 100% module) or
    none (clean), on the same ``n`` raw samples, interleaved; the expected throughput ratio at a rate r follows as
    clean / ((1 - r) clean + r poisoned). Far less noisy than whole passes, so it resolves a 1% effect.

    Reference images are decoded once per process and cached (a worker decodes those it needs once per epoch)."""
    from datamodules.decode import decode_sample
    from datamodules.faults import FaultCounter

    everything = next(name for name in modules if name.endswith("100%"))
    streams = {}
    for name in ("clean", everything):
        modules[name].setup("fit")
        streams[name] = modules[name].train_stream()
    urls = [shard.url for shard in modules["clean"].index("train").shards]
    raw = list(itertools.islice(streams["clean"].raw_samples(urls), n))
    need_text = isinstance(modules["clean"], CLIPDataModule)
    faults = FaultCounter()

    def run(name: str) -> float:
        stream, module = streams[name], modules[name]
        started = time.process_time()
        for sample in raw:
            decoded = decode_sample(sample, faults, need_label=False, need_text=need_text)
            module.train_item(stream.poison(decoded), 0)
        return (time.process_time() - started) / len(raw) * 1e6

    for name in streams:  # warm-up: lazy transforms, the references' decode cache
        run(name)
    costs = interleaved({name: (lambda name=name: run(name)) for name in streams}, repeats)
    clean, poisoned = Series("clean", costs["clean"]), Series(everything, costs[everything])
    expected = {rate: clean.median / ((1 - rate) * clean.median + rate * poisoned.median) for rate in GOALS}
    row = [label, n, f"{clean.median:.0f} ({clean.spread()})", f"{poisoned.median:.0f} ({poisoned.spread()})"]
    row += [f"**{expected[rate]:.3f}** ({verdict(expected[rate], GOALS[rate])})" for rate in GOALS]
    print(f"  {label}: clean {clean.median:.0f} us/sample, poisoned {poisoned.median:.0f} us/sample", flush=True)
    return {
        "case": label,
        "clean_us": clean.values,
        "poisoned_us": poisoned.values,
        "expected_ratio": {str(rate): value for rate, value in expected.items()},
        "row": row,
    }


HEADERS = [
    "pipeline",
    "attack",
    "workers",
    "poisoned keys",
    "clean samples/s (wall)",
    "poisoned samples/s (wall)",
    "poisoned/clean (wall)",
    "clean samples/CPU-s",
    "poisoned samples/CPU-s",
    "poisoned/clean (CPU)",
    "verdict: CPU / wall",
]


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="loader worker processes (default 0 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--samples", type=int, default=None, help="CIFAR-10 samples per pass (default 1024 / 4096)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["simclr", "clip-tiny", "clip-vit-b-32", "passes", "per-sample"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 5)
    workers_list = args.workers or ([2] if quick else [0, 2])
    n_small = args.samples or (1024 if quick else 4096)
    n_large = 1024
    batch = 256
    out = args.cache / "poisoning"
    info = machine()
    print_machine(info)
    small = cifar_like_shards(args, out, n=n_small, shards=8)
    references = reference_shards(args, out)
    print(f"data: {n_small} CIFAR-10 samples in 8 shards ({small.parent.name}); NA references: {references}")
    print(f"batch {batch} (ViT-B-32: 64); {repeats} interleaved repeats of one full pass per contender")

    results = []
    for workers in workers_list if "passes" not in args.skip else []:
        if "simclr" not in args.skip:
            modules = simclr_modules(small, references, batch, workers)
            results += compare("SimCLR 32 px", modules, repeats, workers)
        if "clip-tiny" not in args.skip:
            results += compare(
                "CLIP clip-tiny-vit 32 px", clip_modules(small, "clip-tiny-vit", batch, workers), repeats, workers
            )
        # 1% of a quick-sized set is a handful of samples; at 224 px one worker setting tells enough
        if "clip-vit-b-32" not in args.skip and not quick and workers == max(workers_list):
            large = large_image_shards(args, out, n=n_large, shards=8)
            results += compare("CLIP ViT-B-32 224 px", clip_modules(large, "ViT-B-32", 64, workers), repeats, workers)
    costs = []
    if "per-sample" not in args.skip:
        print("per-sample cost, one process (decode -> poison stage -> item):")
        n_cost = 256 if quick else 1024
        if "simclr" not in args.skip:
            costs.append(
                per_sample_costs("SimCLR 32 px, NA", simclr_modules(small, references, batch, 0), n_cost, repeats)
            )
        if "clip-tiny" not in args.skip:
            costs.append(
                per_sample_costs(
                    "CLIP clip-tiny-vit 32 px, BadNet", clip_modules(small, "clip-tiny-vit", batch, 0), n_cost, repeats
                )
            )
        if "clip-vit-b-32" not in args.skip and not quick:
            large = large_image_shards(args, out, n=n_large, shards=8)
            costs.append(
                per_sample_costs("CLIP ViT-B-32 224 px, BadNet", clip_modules(large, "ViT-B-32", 64, 0), 256, repeats)
            )
    if results:
        print()
        print("samples/s: median (min..max) over repeats; ratios: median (min..max) of the per-repeat poisoned/clean;")
        print("CPU = samples per CPU-second of the main process and its workers")
        print_table(HEADERS, [r["row"] for r in results])
    if costs:
        print()
        print("per-sample CPU cost in one process, us: median (min..max) over interleaved repeats; expected")
        print("throughput ratio at rate r = clean / ((1 - r) clean + r poisoned)")
        print_table(
            [
                "pipeline",
                "samples",
                "clean us/sample",
                "poisoned us/sample",
                "expected ratio at 1%",
                "expected ratio at 100%",
            ],
            [c["row"] for c in costs],
        )
    print()
    for r in results:
        print(
            f"verdict {r['case']}, {r['attack']}, {r['workers']} workers: poisoned/clean = "
            f"{r['cpu']['ratio_median']:.3f} CPU, {r['wall']['ratio_median']:.3f} wall (goal >= {r['goal']}) -> "
            f"{verdicts(r, r['goal'])}"
        )
    load_at_end(info)
    write_json(
        args.json,
        {
            "machine": info,
            "quick": quick,
            "results": [{k: v for k, v in r.items() if k != "row"} for r in results],
            "per_sample": [{k: v for k, v in c.items() if k != "row"} for c in costs],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
