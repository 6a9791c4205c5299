"""The Lightning training step's throughput as a ratio to a hand-written PyTorch loop on the same model and batches.

Both contenders train a freshly built model (same seed) on the same batches, made once by clbd's data module from
real shards and held in memory (the data pipeline is not measured), with the same torch thread count:

* ``lightning``: ``lightning.Trainer(accelerator="cpu", max_steps=..., logger=False, enable_checkpointing=False,
  enable_progress_bar=False, enable_model_summary=False).fit(module, train_dataloaders=batches)`` with clbd's
  module as it trains (its ``training_step`` with logging and poisoned-sample bookkeeping, its
  ``configure_optimizers``: LARS or AdamW, warm-up + cosine ``LambdaLR`` stepped per step; CLIP clamps its logit
  scale after each step);
* ``plain``: a loop doing the same forward, loss (NT-Xent / open_clip's ClipLoss), ``zero_grad(set_to_none=True)``,
  backward, optimiser step, schedule step (and the logit-scale clamp for CLIP), with optimiser, parameter groups
  and schedule built by the same clbd functions.

Each contender runs ``warmup`` steps untimed, then ``steps`` timed steps: from the start of step ``warmup`` to the
start of step ``warmup + steps`` (Lightning: ``on_train_batch_start`` hooks), so every timed step is whole.
Goal: lightning / plain >= 0.95 steps/s.

Run: ``python benchmarks/training_step.py [--quick]``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Series,
    base_parser,
    cifar_like_shards,
    interleaved,
    load_at_end,
    machine,
    paired_ratios,
    print_machine,
    print_table,
    verdicts,
    write_json,
)
from datamodules import CLIPDataModule, SimCLRDataModule  # noqa: E402
from lightning_modules.clip import CLIP  # noqa: E402
from lightning_modules.optim import build_optimizer, param_groups_no_decay, warmup_cosine  # noqa: E402
from lightning_modules.simclr import SimCLR  # noqa: E402

GOAL = 0.95


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class StepClock(L.Callback):
    """Clock readings at the start of training steps ``first`` and ``last`` (timed: ``first .. last - 1``).

    ``sync``: wait for the accelerator's queued work first (CUDA runs asynchronously)."""

    def __init__(self, first: int, last: int, sync: bool = False):
        self.first, self.last, self.sync = first, last, sync
        self.readings: dict[int, tuple[float, float]] = {}
        self.threads = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in (self.first, self.last):
            if self.sync:
                torch.cuda.synchronize()
            self.readings[trainer.global_step] = clock()
            self.threads = torch.get_num_threads()


def rates(start: tuple[float, float], end: tuple[float, float], steps: int) -> dict[str, float]:
    return {"wall": steps / (end[0] - start[0]), "cpu": steps / (end[1] - start[1])}


# ---- the models and their plain loops ----------------------------------------------------------------------------
def build_simclr(width: int) -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(backbone="resnet18", width=width, cifar_stem=True)


def build_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(model_name="clip-tiny-vit")


def optimizer_and_schedule(module, total: int):
    """What ``ContrastiveModule.configure_optimizers`` builds, from the same clbd pieces, without a trainer."""
    hp = module.hparams
    groups = param_groups_no_decay(module, hp.weight_decay)
    optimizer = build_optimizer(
        hp.optimizer, groups, lr=hp.lr, momentum=hp.momentum, betas=tuple(hp.betas), eps=hp.eps, impl=hp.optimizer_impl
    )
    warmup = hp.warmup_steps or int(hp.warmup_fraction * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total, base=1.0, final=hp.min_lr_ratio)
    )
    return optimizer, schedule


def simclr_loss(module: SimCLR, batch: dict[str, Any]) -> torch.Tensor:
    view1, view2 = batch["views"]
    z = module.projector(module.encoder(torch.cat([view1, view2])))
    z1, z2 = z.chunk(2)
    return module.loss(z1, z2)


def clip_loss(module: CLIP, batch: dict[str, Any]) -> torch.Tensor:
    model = module.model
    image = model.encode_image(batch["image"], normalize=True)
    text = model.encode_text(batch["text"], normalize=True)
    return module.loss(image, text, model.logit_scale.exp())


def plain_run(kind: str, build, batches: list, warmup: int, steps: int) -> dict[str, float]:
    module = build()
    module.train()
    total = warmup + steps + 1  # the schedule length Lightning gets (max_steps)
    optimizer, schedule = optimizer_and_schedule(module, total)
    loss_fn = simclr_loss if kind == "simclr" else clip_loss
    start = None
    for i in range(warmup + steps):
        if i == warmup:
            start = clock()
        batch = batches[i % len(batches)]
        loss = loss_fn(module, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if kind == "clip":
            with torch.no_grad():
                module.model.logit_scale.clamp_(0, math.log(module.hparams.max_logit_scale))
    assert start is not None
    return {**rates(start, clock(), steps), "threads": torch.get_num_threads()}


def lightning_run(
    build, batches: list, warmup: int, steps: int, callbacks: tuple = (), extra_steps: int = 0, **trainer_options: Any
) -> dict[str, Any]:
    """``trainer_options`` override the CPU defaults (e.g. ``accelerator="cuda", precision="bf16-mixed"``);
    ``callbacks`` join the run (a profiler), ``extra_steps`` run after the timed ones (for it). The trained module
    comes back as ``module``."""
    module = build()
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps + extra_steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    options.update(trainer_options)
    timer = StepClock(warmup, warmup + steps, sync=options["accelerator"] in ("cuda", "gpu"))
    trainer = L.Trainer(callbacks=[timer, *callbacks], **options)
    feed = InMemoryBatches([batches[i % len(batches)] for i in range(warmup + steps + extra_steps + 1)])
    fit_start = time.perf_counter()
    trainer.fit(module, train_dataloaders=feed)
    fit_seconds = time.perf_counter() - fit_start
    result = rates(timer.readings[warmup], timer.readings[warmup + steps], steps)
    timed = steps / result["wall"]
    return {**result, "threads": timer.threads, "fit_overhead_s": fit_seconds - timed, "module": module}


def numbers_only(run: dict[str, Any]) -> dict[str, Any]:
    """A run's readings without its trained module (for tables and JSON)."""
    return {k: v for k, v in run.items() if k != "module"}


class InMemoryBatches:
    """Ready batches as one loader (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ---- data --------------------------------------------------------------------------------------------------------
def make_batches(
    kind: str, index_file: Path, batch: int, count: int, model_name: str = "clip-tiny-vit", **data_options: Any
) -> list[dict[str, Any]]:
    """``count`` real training batches from clbd's data module, held in memory (``data_options``: more arguments of
    the data module, e.g. ``views_on_device=True``: uint8 images and view parameters instead of views)."""
    common = dict(train_shards=str(index_file), val_shards=None, batch_size=batch, num_workers=0, **data_options)
    module = SimCLRDataModule(**common) if kind == "simclr" else CLIPDataModule(model_name=model_name, **common)
    batches = []
    for b in module.train_dataloader():
        batches.append(b)
        if len(batches) == count:
            return batches
    raise ValueError(f"{index_file} gives fewer than {count} batches of {batch}")


def compare(label: str, kind: str, build, batches: list, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    runs = interleaved(
        {
            "lightning": lambda: numbers_only(lightning_run(build, batches, warmup, steps)),
            "plain": lambda: plain_run(kind, build, batches, warmup, steps),
        },
        repeats,
    )
    result: dict[str, Any] = {"case": label, "steps": steps, "warmup": warmup, "runs": runs}
    row: list[object] = [label, runs["plain"][0]["threads"], f"{warmup}+{steps}"]
    for metric in ("wall", "cpu"):
        lightning = Series("lightning", [r[metric] for r in runs["lightning"]])
        plain = Series("plain", [r[metric] for r in runs["plain"]])
        ratio = paired_ratios(lightning, plain)
        result[metric] = {"ratio": ratio.values, "ratio_median": ratio.median}
        row += [
            f"{lightning.median:.3g} ({lightning.spread()})",
            f"{plain.median:.3g} ({plain.spread()})",
            f"**{ratio.median:.3f}** ({ratio.spread()})",
        ]
    overhead = Series("", [r["fit_overhead_s"] for r in runs["lightning"]])
    row += [f"{overhead.median:.1f}", verdicts(result, GOAL)]
    result["row"] = row
    threads = {r["threads"] for rs in runs.values() for r in rs}
    if len(threads) != 1:
        raise RuntimeError(f"{label}: the contenders ran with different torch thread counts {threads}")
    print(
        f"  {label}: lightning/plain wall {result['wall']['ratio_median']:.3f}, CPU {result['cpu']['ratio_median']:.3f}",
        flush=True,
    )
    return result


HEADERS = [
    "model",
    "threads",
    "warm-up+timed steps",
    "lightning steps/s (wall)",
    "plain steps/s (wall)",
    "lightning/plain (wall)",
    "lightning steps/CPU-s",
    "plain steps/CPU-s",
    "lightning/plain (CPU)",
    "fit() fixed cost s",
    f"verdict (goal >= {GOAL}): CPU / wall",
]


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both contenders (1: intra-op threads on a busy shared machine stall at barriers, "
        "which swamps the comparison)",
    )
    parser.add_argument("--width", type=int, default=16, help="base width of the narrow ResNet-18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 4 / 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 2 / 3)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["simclr", "clip-tiny"])
    args = parser.parse_args()
    threads = args.threads
    torch.set_num_threads(threads)
    for name in ("lightning.pytorch", "lightning.fabric", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)  # Lightning's banners, open_clip's "no pretrained weights"
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*set_vital.*")
    warnings.filterwarnings("ignore", ".*srun.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    quick = args.quick
    repeats = args.repeats or (3 if quick else 5)
    steps = args.steps or (4 if quick else 20)
    warmup = args.warmup if args.warmup is not None else (2 if quick else 3)
    info = machine()
    print_machine(info)
    distinct = 4
    index_file = cifar_like_shards(args, args.cache / "training_step", n=distinct * args.batch, shards=1)
    print(
        f"batches: {distinct} distinct real batches of {args.batch} CIFAR-10 samples made by clbd's data module, "
        f"cycled; torch threads {threads}; {repeats} interleaved repeats, a fresh model (seed 0) per run"
    )
    results = []
    if "simclr" not in args.skip:
        batches = make_batches("simclr", index_file, args.batch, distinct)
        label = f"SimCLR ResNet-18 width {args.width}, LARS, batch {args.batch}"
        results.append(compare(label, "simclr", lambda: build_simclr(args.width), batches, warmup, steps, repeats))
    if "clip-tiny" not in args.skip:
        batches = make_batches("clip", index_file, args.batch, distinct)
        label = f"CLIP clip-tiny-vit, AdamW, batch {args.batch}"
        results.append(compare(label, "clip", build_clip, batches, warmup, steps, repeats))
    print()
    print("steps/s: median (min..max) over repeats; ratios: median (min..max) of the per-repeat lightning/plain;")
    print("CPU = steps per CPU-second of the process (all threads); fit() fixed cost = fit's wall time outside the")
    print("timed steps (set-up, warm-up steps, tear-down), paid once per fit, not per step")
    print_table(HEADERS, [r["row"] for r in results])
    print()
    for r in results:
        print(
            f"verdict {r['case']}: lightning/plain = {r['cpu']['ratio_median']:.3f} CPU, "
            f"{r['wall']['ratio_median']:.3f} wall (goal >= {GOAL}) -> {verdicts(r, GOAL)}"
        )
    load_at_end(info)
    write_json(
        args.json,
        {"machine": info, "quick": quick, "results": [{k: v for k, v in r.items() if k != "row"} for r in results]},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
