"""clbd's training data pipeline vs a bare loop doing the same decode and transforms from the same shards.

Contenders (same shard files, same batch size, same number of loader worker processes, one full pass each):

* ``clbd``: ``SimCLRDataModule(...).train_dataloader()`` / ``CLIPDataModule(...).train_dataloader()`` iterated as
  a training run does: webdataset's tar iterators, shard split by worker, shuffle buffer over raw bytes, decode with
  the fault checks, the (clean) poison stage, views seeded per (seed, epoch, key, view), the batch dict with keys,
  ``poisoned`` flags and stream statistics, torchdata's StatefulDataLoader.
* ``bare``: a torch ``DataLoader`` over an ``IterableDataset`` that splits the shard list by worker and, per shard,
  reads members with ``tarfile``, decodes with PIL + ``convert("RGB")``, applies the same torchvision pipeline twice
  (``SimCLRAugmentation().build()``; CLIP: open_clip's train ``image_transform`` and per-sample tokenizer call, as
  open_clip's own webdataset pipeline does) with torch's unseeded generator, and stacks full batches.

Goal: clbd / bare >= 0.9 samples/s. Also: peak RSS of one clbd pass over the same samples in 4, 32, 256 shards,
each in a fresh process (it must not grow with the number of shards).

Run: ``python benchmarks/data_pipeline.py [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import resource
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, get_worker_info  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Series,
    base_parser,
    batch_size_of,
    cifar_like_shards,
    interleaved,
    large_image_shards,
    load_at_end,
    machine,
    one_pass,
    paired_ratios,
    print_machine,
    print_table,
    verdicts,
    write_json,
)
from datamodules import CLIPDataModule, SimCLRDataModule, resolve_shards  # noqa: E402
from datamodules.views import SimCLRAugmentation  # noqa: E402

GOAL = 0.9


# ---- the bare contender ------------------------------------------------------------------------------------------
def tar_samples(url: str) -> Iterator[dict[str, bytes]]:
    """{ext: bytes} per key of one tar, members of a key being adjacent (how ShardSink writes them)."""
    with tarfile.open(url, mode="r:") as tar:
        key, sample = None, {}
        for info in tar:
            if not info.isreg():
                continue
            stem, _, ext = info.name.partition(".")
            if stem != key and sample:
                yield sample
                sample = {}
            key = stem
            sample[ext] = tar.extractfile(info).read()
        if sample:
            yield sample


class BareStream(IterableDataset):
    """Shards split by worker; each sample decoded and turned into an item by ``make_item``; full batches only."""

    def __init__(self, urls: list[str], batch_size: int, make_item: Callable, collate: Callable):
        super().__init__()
        self.urls, self.batch_size, self.make_item, self.collate = urls, batch_size, make_item, collate

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        items = []
        for url in self.urls[worker::workers]:
            for sample in tar_samples(url):
                image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
                items.append(self.make_item(image, sample))
                if len(items) == self.batch_size:
                    yield self.collate(items)
                    items = []


class BareSimCLRItem:
    def __init__(self):
        self.transform = SimCLRAugmentation().build()

    def __call__(self, image: Image.Image, sample: dict[str, bytes]):
        return self.transform(image), self.transform(image), int(sample["cls"])


def bare_simclr_collate(items: list[tuple]) -> dict[str, Any]:
    v1, v2, labels = zip(*items)
    return {"views": [torch.stack(v1), torch.stack(v2)], "label": torch.tensor(labels)}


class BareCLIPItem:
    def __init__(self, model_name: str):
        import open_clip

        from datamodules.openclip_configs import register_model_configs

        register_model_configs()  # clbd's tiny configs are plain open_clip JSON configs
        size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
        self.transform = open_clip.image_transform(size, is_train=True)
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def __call__(self, image: Image.Image, sample: dict[str, bytes]):
        return self.transform(image), self.tokenizer([sample["txt"].decode("utf-8")])[0]


def bare_clip_collate(items: list[tuple]) -> dict[str, Any]:
    images, texts = zip(*items)
    return {"image": torch.stack(images), "text": torch.stack(texts)}


def bare_loader(index_file: Path, kind: str, batch: int, workers: int, model_name: str = "") -> DataLoader:
    urls = resolve_shards(str(index_file)).urls
    if kind == "simclr":
        dataset = BareStream(urls, batch, BareSimCLRItem(), bare_simclr_collate)
    else:
        dataset = BareStream(urls, batch, BareCLIPItem(model_name), bare_clip_collate)
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False
    )


# ---- the clbd contender ------------------------------------------------------------------------------------------
def clbd_loader(index_file: Path, kind: str, batch: int, workers: int, model_name: str = "", **extra: Any):
    common = dict(train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=workers, **extra)
    if kind == "simclr":
        module = SimCLRDataModule(**common)
    else:
        module = CLIPDataModule(model_name=model_name, **common)
    return module.train_dataloader()


# ---- throughput comparisons --------------------------------------------------------------------------------------
def compare(label: str, index_file: Path, kind: str, batch: int, workers: int, repeats: int, model_name: str = ""):
    loaders = {
        "clbd": clbd_loader(index_file, kind, batch, workers, model_name),
        "bare": bare_loader(index_file, kind, batch, workers, model_name),
    }
    for loader in loaders.values():  # warm-up: page cache, lazy imports, transforms built
        for _, _ in zip(range(2), loader):
            pass
    runs = interleaved({name: (lambda loader=loader: one_pass(loader)) for name, loader in loaders.items()}, repeats)
    result: dict[str, Any] = {"case": label, "workers": workers, "batch": batch}
    row: list[object] = [label, workers]
    for metric in ("wall", "cpu"):
        clbd = Series("clbd", [run[metric] for run in runs["clbd"]])
        bare = Series("bare", [run[metric] for run in runs["bare"]])
        ratio = paired_ratios(clbd, bare)
        result[metric] = {"clbd": clbd.values, "bare": bare.values, "ratio": ratio.values, "ratio_median": ratio.median}
        row += [
            f"{clbd.median:.0f} ({clbd.spread()})",
            f"{bare.median:.0f} ({bare.spread()})",
            f"**{ratio.median:.3f}** ({ratio.spread()})",
        ]
    row.append(verdicts(result, GOAL))
    result["row"] = row
    return result


# ---- where the time goes: each stage alone, CPU time per sample, one process -----------------------------------
def cpu_per_item(fn: Callable[[], int], repeats: int) -> Series:
    """CPU microseconds per item of ``fn`` (which returns how many items it handled), ``repeats`` times."""
    series = Series("")
    for _ in range(repeats):
        started = time.process_time()
        count = fn()
        series.values.append((time.process_time() - started) / count * 1e6)
    return series


def stage_breakdown(index_file: Path, kind: str, model_name: str, n: int, batch: int, repeats: int):
    """clbd's stages (through the stream's own methods) against the bare loop's, on the same ``n`` samples."""
    from datamodules.decode import decode_sample
    from datamodules.faults import FaultCounter
    from datamodules.stream import default_collate

    if kind == "simclr":
        module = SimCLRDataModule(train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=0)
        bare_item, bare_collate = BareSimCLRItem(), bare_simclr_collate
    else:
        module = CLIPDataModule(
            train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=0, model_name=model_name
        )
        bare_item, bare_collate = BareCLIPItem(model_name), bare_clip_collate
    stream = module.train_stream()
    urls = resolve_shards(str(index_file)).urls
    raw = list(itertools.islice(stream.raw_samples(urls), n))
    faults = FaultCounter()
    need_text = kind == "clip"

    def decoded_clbd():
        return [decode_sample(r, faults, need_label=False, need_text=need_text) for r in raw]

    def decoded_bare():
        return [Image.open(io.BytesIO(r["jpg"])).convert("RGB") for r in raw]

    samples = [stream.poison(s) for s in decoded_clbd()]
    images = decoded_bare()
    items_clbd = [module.train_item(s, 0) for s in samples]
    items_bare = [bare_item(image, r) for image, r in zip(images, raw)]
    batches = [slice(i, i + batch) for i in range(0, n - batch + 1, batch)] or [slice(0, n)]

    def count(fn):
        return lambda: (fn(), n)[1]

    def collated(collate: Callable, items: list) -> Callable[[], int]:
        def run() -> int:
            for part in batches:
                collate(items[part])
            return sum(len(items[part]) for part in batches)

        return run

    def read_bare() -> list:
        return list(itertools.islice(itertools.chain.from_iterable(map(tar_samples, urls)), n))

    stages = [
        ("read tar members", count(lambda: list(itertools.islice(stream.raw_samples(urls), n))), count(read_bare)),
        ("shuffle buffer (raw bytes)", count(lambda: list(stream.shuffled(iter(raw), random.Random(0)))), None),
        ("decode", count(decoded_clbd), count(decoded_bare)),
        ("poison stage (clean run)", count(lambda: [stream.poison(dict(s)) for s in samples]), None),
        (
            "views (SimCLR) / preprocess + tokens (CLIP)",
            count(lambda: [module.train_item(s, 0) for s in samples]),
            count(lambda: [bare_item(image, r) for image, r in zip(images, raw)]),
        ),
        ("collate", collated(default_collate, items_clbd), collated(bare_collate, items_bare)),
    ]
    rows, data = [], []
    totals = {"clbd": 0.0, "bare": 0.0}
    for name, clbd_fn, bare_fn in stages:
        clbd = cpu_per_item(clbd_fn, repeats)
        bare = cpu_per_item(bare_fn, repeats) if bare_fn is not None else Series("", [0.0] * repeats)
        totals["clbd"] += clbd.median
        totals["bare"] += bare.median
        rows.append(
            [
                name,
                f"{clbd.median:.0f} ({clbd.spread()})",
                f"{bare.median:.0f} ({bare.spread()})",
                f"{clbd.median - bare.median:+.0f}",
            ]
        )
        data.append({"stage": name, "clbd_us": clbd.values, "bare_us": bare.values})
    rows.append(
        [
            "sum of stages",
            f"{totals['clbd']:.0f}",
            f"{totals['bare']:.0f}",
            f"{totals['clbd'] - totals['bare']:+.0f} (bare/clbd {totals['bare'] / totals['clbd']:.3f})",
        ]
    )
    return rows, data


# ---- peak memory against the number of shards --------------------------------------------------------------------
def proc_status_kb(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS: now; VmHWM: this process's peak since its exec).

    VmHWM rather than getrusage's ru_maxrss: Linux carries the pre-exec high-water mark into ru_maxrss, so a child
    started by a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_child(spec: dict[str, Any]) -> None:
    """Runs in a fresh process: one clbd pass; RSS before it, and the peak RSS of this process and its workers."""
    torch.set_num_threads(1)
    loader = clbd_loader(Path(spec["index"]), "simclr", spec["batch"], spec["workers"])
    before = proc_status_kb("VmRSS")  # everything imported and the loader built: what the pass starts from
    started = time.perf_counter()
    samples = sum(batch_size_of(batch) for batch in loader)
    result = {
        "samples": samples,
        "seconds": time.perf_counter() - started,
        "before_kb": before,
        "self_kb": proc_status_kb("VmHWM"),
        # forked workers: their peak, which counts the pages they share with this process
        "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }
    print(json.dumps(result))


def measure_rss(index_file: Path, workers: int, batch: int) -> dict[str, Any]:
    spec = json.dumps({"index": str(index_file), "workers": workers, "batch": batch})
    done = subprocess.run([sys.executable, __file__, "--rss-child", spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"peak-RSS child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main --------------------------------------------------------------------------------------------------------
THROUGHPUT_HEADERS = [
    "pipeline",
    "workers",
    "clbd samples/s (wall)",
    "bare samples/s (wall)",
    "clbd/bare (wall)",
    "clbd samples/CPU-s",
    "bare samples/CPU-s",
    "clbd/bare (CPU)",
    f"verdict (goal >= {GOAL}): CPU / wall",
]


def run_throughput(args, cases, workers_list, repeats) -> list[dict[str, Any]]:
    results = []
    for label, index_file, kind, batch, model_name in cases:
        for workers in workers_list:
            result = compare(label, index_file, kind, batch, workers, repeats, model_name)
            print(
                f"  {label}, {workers} workers: clbd/bare wall {result['wall']['ratio_median']:.3f}, "
                f"CPU {result['cpu']['ratio_median']:.3f}",
                flush=True,
            )
            results.append(result)
    print()
    print(f"throughput: median (min..max) over {repeats} interleaved repeats of one full pass; ratios are medians of")
    print("the per-repeat clbd/bare ratios; CPU = samples per CPU-second of the main process and its workers")
    print_table(THROUGHPUT_HEADERS, [r["row"] for r in results])
    return results


def raw_reads_per_pass(index_file: Path, batch: int) -> dict[str, int]:
    """Raw samples one clbd training stream (one process) reads from the tars in a pass, against what it delivers.

    Reads are the stream's own count (``ShardStream.raw_reads``); items are trivial so that a pass is cheap. A bare
    loop reads each sample once."""
    module = SimCLRDataModule(train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=0)
    stream = module.train_stream()
    stream.configure(rank=0, world_size=1, num_workers=0)
    stream.to_item = lambda sample, epoch: {"one": 1}
    before = stream.raw_reads
    delivered = sum(len(b["one"]) for b in stream)
    return {
        "read": stream.raw_reads - before,
        "delivered": delivered,
        "in_shards": resolve_shards(str(index_file)).total,
        "shuffle_buffer": stream.shuffle_buffer,
    }


def run_breakdown(cases, n_small: int, n_large: int, repeats: int) -> list[dict[str, Any]]:
    out = []
    if cases:
        reads = raw_reads_per_pass(cases[0][1], cases[0][3])
        print()
        print(
            f"tar reads in one pass of one clbd stream (no workers): {reads['read']} raw samples read to deliver "
            f"{reads['delivered']} of the {reads['in_shards']} in the shards (shuffle buffer {reads['shuffle_buffer']}); "
            f"a bare loop reads each once"
        )
        out.append({"case": "raw reads per pass", **reads})
    for label, index_file, kind, batch, model_name in cases:
        n = n_large if model_name == "ViT-B-32" else n_small
        rows, data = stage_breakdown(index_file, kind, model_name, n, min(batch, n), repeats)
        print()
        print(
            f"where the time goes, {label}: CPU microseconds per sample, one process, {n} samples, "
            f"median (min..max) of {repeats}"
        )
        print_table(["stage", "clbd us/sample", "bare us/sample", "clbd - bare"], rows)
        out.append({"case": label, "stages": data})
    return out


def run_memory(args, out: Path, n: int, workers_list: list[int], batch: int) -> list[dict[str, Any]]:
    print()
    print(f"peak RSS of one clbd SimCLR pass over the same {n} samples split into N shards (a fresh process each);")
    print("'before' = RSS of the process with everything imported and the loader built, before the pass")
    memory, rows = [], []
    for workers in workers_list:
        for shards in (4, 32, 256):
            index_file = cifar_like_shards(args, out, n=n, shards=shards)
            rss = measure_rss(index_file, workers, batch)
            memory.append({"shards": shards, "workers": workers, **rss})
            worker_mib = f"{rss['children_kb'] / 1024:.0f}" if workers else "-"
            rows.append(
                [
                    shards,
                    workers,
                    rss["samples"],
                    f"{rss['before_kb'] / 1024:.0f}",
                    f"{rss['self_kb'] / 1024:.0f}",
                    f"{(rss['self_kb'] - rss['before_kb']) / 1024:+.0f}",
                    worker_mib,
                    f"{rss['seconds']:.1f}",
                ]
            )
    headers = [
        "shards",
        "workers",
        "samples",
        "main RSS before MiB",
        "main peak MiB",
        "main growth MiB",
        "largest worker peak MiB",
        "pass s",
    ]
    print_table(headers, rows)
    for workers in workers_list:
        peaks = [max(m["self_kb"], m["children_kb"]) for m in memory if m["workers"] == workers]
        print(f"  workers={workers}: peak RSS with 256 shards / with 4 shards = {peaks[-1] / peaks[0]:.3f}")
    return memory


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="loader worker processes (default 0 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--samples", type=int, default=None, help="CIFAR-10 samples per pass (default 1024 / 4096)")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["simclr", "clip-tiny", "clip-vit-b-32", "rss", "breakdown"]
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return 0
    torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 5)
    workers_list = args.workers or ([2] if quick else [0, 2])
    n_small, n_large = (1024, 128) if quick else (4096, 1024)
    n_small = args.samples or n_small
    batch = 256
    out = args.cache / "data_pipeline"
    info = machine()
    print_machine(info)

    small = cifar_like_shards(args, out, n=n_small, shards=8)
    print(f"data: {n_small} CIFAR-10 samples (caption 'a photo of a <class>.') in 8 shards ({small.parent.name})")
    cases = []
    if "simclr" not in args.skip:
        cases.append(("SimCLR 32 px, 2 views", small, "simclr", batch, ""))
    if "clip-tiny" not in args.skip:
        cases.append(("CLIP clip-tiny-vit 32 px", small, "clip", batch, "clip-tiny-vit"))
    if "clip-vit-b-32" not in args.skip:
        large = large_image_shards(args, out, n=n_large, shards=8)
        print(f"large images: {n_large} captioned JPEGs, longer side 256-500 px, in 8 shards ({large.parent.name})")
        cases.append(("CLIP ViT-B-32 224 px", large, "clip", 64, "ViT-B-32"))
    print(f"batch {batch} (ViT-B-32: 64); contenders: see this file's docstring")

    payload: dict[str, Any] = {"machine": info, "quick": quick}
    results = run_throughput(args, cases, workers_list, repeats)
    payload["throughput"] = [{k: v for k, v in r.items() if k != "row"} for r in results]
    if "breakdown" not in args.skip:
        payload["breakdown"] = run_breakdown(cases, 256 if quick else 1024, 64 if quick else 256, repeats)
    if "rss" not in args.skip:
        payload["memory"] = run_memory(args, out, 1024 if quick else 4096, [0] if quick else [0, 2], batch)
    print()
    for r in results:
        print(
            f"verdict {r['case']}, {r['workers']} workers: clbd/bare = {r['wall']['ratio_median']:.3f} wall, "
            f"{r['cpu']['ratio_median']:.3f} CPU (goal >= {GOAL}) -> {verdicts(r, GOAL)}"
        )
    load_at_end(info)
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
