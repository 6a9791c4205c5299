"""Training throughput (images/s) and model FLOPs utilisation (MFU) of clbd's SimCLR and CLIP steps on one device.

What runs: clbd's LightningModules under ``lightning.Trainer`` (``precision`` bf16-mixed on CUDA by default) on
real batches made once by clbd's data modules and moved to the device beforehand (the data pipeline and host-to-device
copies are not measured here; ``benchmarks/data_pipeline.py`` measures the pipeline):

* SimCLR: ResNet-18 with the CIFAR stem, 32 px CIFAR-10 views, LARS, batch 512 (``--quick``: width 8, batch 32);
* CLIP: open_clip ViT-B-32 at 224 px on captioned 256-500 px photos, AdamW, batch 256 (``--quick``: clip-tiny-vit,
  batch 32).

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the same
loss on the same batch (matmuls, convolutions, attention; elementwise work is not counted, as usual for MFU).
MFU = counted FLOPs per step x steps/s / the device's peak dense FLOP/s (a table of known GPUs for bf16, or
``--peak-tflops``). Images/s counts both views for SimCLR (2 x batch images per step) and one image per pair for CLIP.

SimCLR's step under each speed setting (``--simclr-settings``), the same model, batches and FLOPs, side by side in
one call, each as a ratio to ``eager`` measured in the same call (``SIMCLR_SETTINGS``; each names the clbd fit
arguments that turn it on, so a run can take the fastest):

* ``eager``: NCHW views and weights, cuDNN's heuristic algorithm choice, BatchNorm on bf16 inputs, the optimiser one
  parameter at a time (``optimizer_impl=for-loop``), no compilation: the first GPU check's step;
* ``channels_last`` (views and weights), ``cudnn_benchmark`` (``trainer.benchmark``), ``batchnorm_fp32``, ``fp16``
  (``16-mixed`` with its gradient scaler instead of bf16; CUDA only), ``optimizer`` (``fused`` SGD / AdamW,
  ``foreach`` LARS), ``compile`` (``torch.compile`` of encoder and projector), ``compile_cudagraphs``
  (``reduce-overhead``), ``compile_max_autotune`` (``max-autotune-no-cudagraphs``): each alone on top of eager;
* ``all``: channels_last + cudnn_benchmark + batchnorm_fp32 + optimizer + compile together.

A compiled setting runs once, with ``--compile-warmup`` extra untimed steps, its compilation reported as the run's
overhead; compiled settings run after CLIP, slowest last. A setting that fails is reported as failed and the others
go on. Default: all of them on CUDA; eager, channels_last, batchnorm_fp32 and optimizer on a CPU.

CLIP's step under each speed setting (``--clip-settings``), each as a ratio to CLIP's ``eager`` in the same call
(``CLIP_SETTINGS``): ``eager`` (the first check's step: AdamW by torch's rule, foreach on a GPU; batch 256; no
compilation), ``fused_adamw`` (``model.optimizer_impl=fused``), ``double_batch`` (512 per GPU from pairs of the same
batches; ``--quick``: 64; its FLOPs counted at that batch), ``compile`` (both towers, ``lightning_modules.clip``)
and ``all`` (the three together); peak memory per case on CUDA. Default: all of them on CUDA; eager, fused_adamw
and double_batch on a CPU. Compiled settings of both models run last: SimCLR's ``all``, CLIP's ``all``, then
compile alone, CUDA graphs, CLIP's compile, max-autotune.

The table grows call by call (``--measured results/gpu_throughput``): a setting that an earlier call's JSON there
measured without failing, on a device of the same name at the same sizes, is not measured again (eager always
is: every ratio is against eager in the same call), and two at once is taken from the earlier call that measured
it. ``benchmarks/gpu_throughput_table.py`` makes the table of all calls. The JSON's ``fastest_simclr_setting`` is
the setting, from this call or an earlier one, that trains a ``--run-epochs`` (20) epoch run soonest: epochs x its
epoch (step + device views) + its compilation beyond eager's start-up; a run (the experiment arms) takes its
``fit_args``. The JSON also records when (UTC), the code's commit and the library versions.

Each setting also gets an evaluation estimate: the trained module's forward-only images/s at the evaluation batch
size (eval mode, no gradients, the setting's precision and layout), and the time of the kNN vote (one matrix product
and top-k per chunk of queries, bank on the device) for CIFAR-10's 50k bank and 3 x 10k queries, measured once;
evaluation s = 80k images / forward rate + vote time.

Two at once (``--two-at-once on``, the default): the fastest SimCLR setting measured by then (the compiled ones run
later, after CLIP: a minute of compilation in each process would not fit the stage), trained by separate processes of
this script (``--pair-worker``, the same model, batches, warm-up and Trainer as above, ``--pair-steps`` timed steps,
3 x ``--steps`` by default): one alone, then two at once, in the same call. Each process does its warm-up, says it is
ready and waits for the go, so the timed steps of the two overlap. Reported: the pair's aggregate views/s (both
processes' views over the span from the first start to the last end of their timed steps) over the views/s of one
alone (above 1: two at once pays), the slowdown (that span over the alone run's timed seconds: how much longer an arm
takes beside another; 2 / the ratio) and each process's own slowdown. Skipped, with the reason in the JSON, when its
estimate does not fit what is left of ``--time-limit``.

The profiler (``--profile-settings``, names of either model's settings, each profiled in both models where it
exists; default eager and all on CUDA, eager on a CPU) records ``--profile-steps`` steps after the timed ones of
that setting's last run (``benchmarks/step_profile.py``): top kernels and the share of GPU time in convolution,
normalisation, attention, matmul, optimiser, loss, copies; the host time between steps; written into the JSON and,
with ``--profile-md``, as markdown.

SimCLR's views made on the device (``--views device`` or ``both``; ``data.views_on_device``): the same real batches
as uint8 images + view parameters, turned into views by ``datamodules.device_views.DeviceViews`` on the device, timed
alone (views/s) and added to the step: the epoch estimate with device views is 100k views / (step + view making).
The FLOP count is the model's only (the view transform's few MFLOP per image are not counted).

CLIP's training images made on the device (the same ``--views``; ``data.images_on_device``): the real batches as
uint8 images + resampling spans, resampled by ``datamodules.device_clip.DeviceCLIPImages``, timed alone (images/s)
and added to the step the same way.

JPEG decode, only where CUDA is available: the same JPEGs (the CLIP run's photos) decoded by nvjpeg
(``torchvision.io.decode_jpeg(list, device="cuda")``, batches of the CLIP batch size) and by PIL on one CPU core
(``datamodules.decode.decode_image``, what a loader process does), images/s each: which is faster.

Run on a GPU: ``python benchmarks/gpu_throughput.py``; here: ``python benchmarks/gpu_throughput.py --device cpu --quick``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Series,
    base_parser,
    cifar_like_shards,
    iter_samples,
    large_image_shards,
    load_at_end,
    machine,
    print_machine,
    print_table,
    write_json,
)
from benchmarks.gpu_throughput_table import load_calls, number  # noqa: E402
from benchmarks.gpu_throughput_table import mfu as mfu_text  # noqa: E402
from benchmarks.step_profile import ProfileWindow, markdown, summarise  # noqa: E402
from benchmarks.training_step import clip_loss, lightning_run, make_batches, simclr_loss  # noqa: E402
from clbd.experiment.runs import code_version, library_versions  # noqa: E402
from datamodules.decode import decode_image  # noqa: E402
from datamodules.device_clip import DeviceCLIPImagesHook  # noqa: E402
from datamodules.device_views import DeviceViewsHook  # noqa: E402
from datamodules.faults import FaultCounter  # noqa: E402
from datamodules.shards import resolve_shards  # noqa: E402
from datamodules.views import CLIPPreprocess, SimCLRAugmentation  # noqa: E402
from lightning_modules.clip import CLIP  # noqa: E402
from lightning_modules.metrics import weighted_knn_scores  # noqa: E402
from lightning_modules.simclr import SimCLR  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
}


def peak_tflops(device: torch.device, precision: str, given: float | None) -> tuple[float | None, str]:
    if given is not None:
        return given, "--peak-tflops"
    if device.type != "cuda" or not ("bf16" in precision or precision.startswith("16-")):  # fp16 peak = bf16's
        return None, "unknown (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in BF16_PEAK_TFLOPS.items():  # more specific names first
        if key in name:
            return value, f"{name}: bf16 dense {value} TFLOP/s"
    return None, f"{name}: not in the table (give --peak-tflops)"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = [v.to(device) for v in value]
        out[name] = value
    return out


def count_flops(build, loss_fn, batch: dict[str, Any], device: torch.device, precision: str) -> int:
    """FLOPs of one forward + backward of the training loss (a fresh model; autocast like the run)."""
    module = build().to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in precision)
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = loss_fn(module, batch)
        loss.backward()
    return int(counter.get_total_flops())


MEASURED_AT = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
CIFAR10_TRAIN_VIEWS = 2 * 50_000  # one SimCLR epoch: both views of every training image


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_transform_rate(transform, raw_batches: list[dict[str, Any]], device: torch.device, steps: int) -> float:
    """Outputs per second of ``transform(batch)`` (which returns how many it made) on ``device``: the median of the
    timed batches, after two warm-up calls (kernels, allocator)."""
    times, made = [], 0
    for i in range(steps + 2):
        batch = dict(raw_batches[i % len(raw_batches)])
        _sync(device)
        start = time.perf_counter()
        made = transform(batch)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return made / sorted(times)[len(times) // 2]


def device_view_rate(raw_batches: list[dict[str, Any]], device: torch.device, image_size: int, steps: int) -> float:
    """Views per second made by DeviceViews on ``device`` (both views of each batch)."""
    hook = DeviceViewsHook(SimCLRAugmentation(image_size=image_size))

    def views(batch: dict[str, Any]) -> int:
        made = hook.finish(batch)["views"]
        assert made[0].shape[-1] == image_size
        return sum(len(v) for v in made)

    return device_transform_rate(views, raw_batches, device, steps)


def device_image_rate(raw_batches: list[dict[str, Any]], device: torch.device, model_name: str, steps: int) -> float:
    """Training images per second made by DeviceCLIPImages on ``device``."""
    hook = DeviceCLIPImagesHook(CLIPPreprocess(model_name, train=True))

    def images(batch: dict[str, Any]) -> int:
        made = hook.finish(batch)["image"]
        assert made.shape[-1] == hook.transform.size
        return len(made)

    return device_transform_rate(images, raw_batches, device, steps)


def decode_rates(jpegs: list[bytes], device: torch.device, batch: int, steps: int) -> dict[str, Any]:
    """JPEG decode images/s: nvjpeg on ``device`` (lists of ``batch`` JPEGs, median of timed batches after two
    warm-up ones) and PIL on one CPU core (every JPEG once, as a loader process decodes)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    faults = FaultCounter()
    start = time.perf_counter()
    for i, data in enumerate(jpegs):
        decode_image(data, faults, str(i))
    result: dict[str, Any] = {"pil_one_core_per_s": len(jpegs) / (time.perf_counter() - start), "jpegs": len(jpegs)}
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    lists = [encoded[s : s + batch] for s in range(0, len(encoded) - batch + 1, batch)] or [encoded]
    times = []
    try:
        for i in range(steps + 2):
            chunk = lists[i % len(lists)]
            _sync(device)
            start = time.perf_counter()
            decoded = decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
        assert decoded[0].device.type == device.type and decoded[0].shape[0] == 3
    except RuntimeError as error:  # an nvjpeg failure is a result here, not a reason to lose the other numbers
        result["nvjpeg_error"] = str(error).splitlines()[0]
        return result
    result["nvjpeg_per_s"] = len(lists[0]) / sorted(times)[len(times) // 2]
    result["nvjpeg_batch"] = len(lists[0])
    result["faster"] = "nvjpeg" if result["nvjpeg_per_s"] > result["pil_one_core_per_s"] else "PIL (one core)"
    return result


GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "simclr_cifar10_gpu.yaml"

# Each setting: what it changes from eager (the knobs of ``Knobs``). "optimizer" means the fastest implementation
# the optimiser has: fused for SGD / Adam / AdamW, foreach for LARS.
SIMCLR_SETTINGS: dict[str, dict[str, Any]] = {
    "eager": {},
    "channels_last": {"channels_last": True},
    "cudnn_benchmark": {"benchmark": True},
    "batchnorm_fp32": {"batchnorm_fp32": True},
    "fp16": {"precision": "16-mixed"},
    "optimizer": {"optimizer_impl": "fastest"},
    "compile": {"compile_mode": "default"},
    "compile_cudagraphs": {"compile_mode": "reduce-overhead"},
    "compile_max_autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
    "all": {
        "channels_last": True,
        "benchmark": True,
        "batchnorm_fp32": True,
        "optimizer_impl": "fastest",
        "compile_mode": "default",
    },
}
CUDA_ONLY = {"fp16"}
COMPILED = {name for name, knobs in SIMCLR_SETTINGS.items() if "compile_mode" in knobs}
CPU_DEFAULT = ("eager", "channels_last", "batchnorm_fp32", "optimizer")

# CLIP's: "eager" is the first check's step (AdamW by torch's rule: foreach on a GPU; batch 256; no compilation).
CLIP_SETTINGS: dict[str, dict[str, Any]] = {
    "eager": {},
    "fused_adamw": {"optimizer_impl": "fused"},
    "double_batch": {"batch_factor": 2},  # 512 per GPU (--quick: 64)
    "compile": {"compile_mode": "default"},  # both towers (lightning_modules.clip.clip_towers)
    "all": {"optimizer_impl": "fused", "batch_factor": 2, "compile_mode": "default"},
}
CLIP_COMPILED = {name for name, knobs in CLIP_SETTINGS.items() if "compile_mode" in knobs}
CLIP_CPU_DEFAULT = ("eager", "fused_adamw", "double_batch")
COMPILED_ORDER = [
    ("simclr", "all"),
    ("clip", "all"),
    ("simclr", "compile"),
    ("simclr", "compile_cudagraphs"),
    ("clip", "compile"),
    ("simclr", "compile_max_autotune"),
]


def clip_knobs(setting: str) -> dict[str, Any]:
    """Every knob's value under CLIP's ``setting`` (eager's where the setting leaves it)."""
    values: dict[str, Any] = dict(optimizer_impl="auto", batch_factor=1, compile_mode=None)
    values.update(CLIP_SETTINGS[setting])
    return values


def clip_fit_arguments(values: dict[str, Any], batch: int) -> list[str]:
    """The ``clbd fit`` arguments that give a CLIP run these knobs (``batch``: the per-GPU batch they train)."""
    args = [
        f"--model.init_args.optimizer_impl={values['optimizer_impl']}",
        f"--data.init_args.batch_size={batch}",
        f"--model.init_args.compile={'true' if values['compile_mode'] else 'false'}",
    ]
    if values["compile_mode"]:
        args.append(f"--model.init_args.compile_mode={values['compile_mode']}")
    return args


def doubled(batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batches twice as large from pairs of the given ones (the same images, no new data to make)."""
    pairs = [(batches[i], batches[(i + 1) % len(batches)]) for i in range(len(batches))]
    out = []
    for first, second in pairs:
        merged = {}
        for name, value in first.items():
            if isinstance(value, torch.Tensor):
                merged[name] = torch.cat([value, second[name]])
            elif isinstance(value, list):
                merged[name] = value + second[name]
            else:
                merged[name] = value
        out.append(merged)
    return out


# ---- what earlier calls measured (the table grows call by call) ---------------------------------------------------
def device_label(info: dict[str, Any]) -> str:
    """The device a call measured: the GPU's name, else the CPU's model."""
    return str(info.get("gpu") or info.get("cpu"))


def earlier_calls(folder: Path | None, info: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The throughput JSONs in ``folder`` (``results/gpu_throughput``) measured on a device of the same name at the
    same sizes (``--quick`` or not), each with ``file`` set; none for a missing folder."""
    if folder is None or not folder.is_dir():
        return []
    return [
        call
        for call in load_calls(folder)
        if device_label(call.get("machine", {})) == device_label(info) and call.get("quick") == quick
    ]


def measured_before(calls: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(model, setting) -> the file of the earliest call that measured it without failing."""
    found: dict[tuple[str, str], str] = {}
    for call in calls:
        for r in call.get("results", []):
            if r.get("model") and r.get("setting") and "error" not in r:
                found.setdefault((r["model"], r["setting"]), call["file"])
    return found


def fastest_simclr(
    results: list[dict[str, Any]], calls: list[dict[str, Any]], run_epochs: int
) -> dict[str, Any] | None:
    """The SimCLR setting that trains a run of ``run_epochs`` epochs soonest, among this call's results and earlier
    calls' on the same device: epochs x its epoch (step + device views) + what its start costs beyond eager's in its
    own call (a compilation: a minute a run, which a short run may not win back)."""
    candidates = [(r, "this call", results) for r in results]
    candidates += [(r, call["file"], call.get("results", [])) for call in calls for r in call.get("results", [])]
    scored = []
    for r, where, siblings in candidates:
        if r.get("model", "simclr") != "simclr" or not r.get("setting") or "error" in r or not r.get("fit_args"):
            continue
        eager = next((e for e in siblings if e.get("model", "simclr") == "simclr" and e.get("setting") == "eager"), r)
        epoch = r.get("epoch_s_with_device_views") or r["epoch_s_median"]
        extra = max(0.0, max(r.get("fit_overhead_s") or [0]) - max(eager.get("fit_overhead_s") or [0]))
        scored.append((run_epochs * epoch + extra, r, where, epoch, extra))
    if not scored:
        return None
    run_s, best, where, epoch, extra = min(scored, key=lambda item: item[0])
    return {
        "setting": best["setting"],
        "fit_args": best["fit_args"],
        "ratio_vs_eager": best.get("ratio_vs_eager"),
        "epoch_s_with_device_views": best.get("epoch_s_with_device_views"),
        "extra_start_s": extra,
        "run_epochs": run_epochs,
        "run_s_estimate": run_s,
        "measured_in": where,
    }


def knobs(setting: str, optimizer: str, precision: str) -> dict[str, Any]:
    """Every knob's value under ``setting`` (eager's where the setting leaves it)."""
    values: dict[str, Any] = dict(
        channels_last=False,
        benchmark=False,
        batchnorm_fp32=False,
        precision=precision,
        optimizer_impl="for-loop",
        compile_mode=None,
    )
    values.update(SIMCLR_SETTINGS[setting])
    if values["optimizer_impl"] == "fastest":
        values["optimizer_impl"] = "foreach" if optimizer == "lars" else "fused"
    return values


def fit_arguments(values: dict[str, Any]) -> list[str]:
    """The ``clbd fit`` arguments that give a run these knobs (on top of the GPU config)."""
    on = lambda flag: "true" if flag else "false"  # noqa: E731
    args = [
        f"--model.init_args.channels_last={on(values['channels_last'])}",
        f"--data.init_args.channels_last={on(values['channels_last'])}",
        f"--trainer.benchmark={on(values['benchmark'])}",
        f"--model.init_args.batchnorm_fp32={on(values['batchnorm_fp32'])}",
        f"--trainer.precision={values['precision']}",
        f"--model.init_args.optimizer_impl={values['optimizer_impl']}",
        f"--model.init_args.compile={on(values['compile_mode'])}",
    ]
    if values["compile_mode"]:
        args.append(f"--model.init_args.compile_mode={values['compile_mode']}")
    return args


def simclr_builder(values: dict[str, Any], width: int | None, optimizer_args: dict[str, Any]):
    """A function that builds the SimCLR module of a setting's knobs (seed 0), as every run of it does."""

    def build_simclr() -> SimCLR:
        torch.manual_seed(0)
        return SimCLR(
            backbone="resnet18",
            width=width,
            cifar_stem=True,
            channels_last=values["channels_last"],
            batchnorm_fp32=values["batchnorm_fp32"],
            optimizer_impl=values["optimizer_impl"],
            compile=values["compile_mode"] is not None,
            compile_mode=values["compile_mode"] or "default",
            **optimizer_args,
        )

    return build_simclr


def simclr_sizes(quick: bool) -> tuple[int, int | None]:
    """SimCLR's batch and ResNet width here: 512 at full width, or 32 at width 8 (``--quick``)."""
    return (32, 8) if quick else (512, None)


def gpu_config_optimizer() -> tuple[str, dict[str, Any]]:
    """The GPU config's optimiser and its settings (what the experiment arms train with)."""
    import yaml

    model_args = yaml.safe_load(GPU_CONFIG.read_text())["model"]["init_args"]
    optimizer_args = {k: model_args[k] for k in ("optimizer", "lr", "weight_decay", "momentum") if k in model_args}
    return model_args["optimizer"], optimizer_args


def eval_forward_rate(module, device: torch.device, values: dict[str, Any], batch: int, steps: int) -> float:
    """Images/s of the encoder's forward pass as the kNN monitor runs it: eval mode, no gradients, the setting's
    precision (autocast) and layout, ``batch`` random 32 px images."""
    module = module.to(device).eval()
    images = torch.randn(batch, 3, 32, 32, device=device)
    if values["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    precision = values["precision"]
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled="mixed" in precision):
        for i in range(steps + 2):  # two warm-up calls (a compiled encoder compiles for this shape here)
            _sync(device)
            start = time.perf_counter()
            module(images)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return batch / sorted(times)[len(times) // 2]


def knn_vote_seconds(device: torch.device, bank: int, queries: int, dim: int = 512) -> float:
    """Seconds of the kNN monitor's vote (``weighted_knn_scores``: one matrix product and top-k per chunk of
    queries, the bank on the device) for ``queries`` against ``bank`` features, the second of two calls."""
    generator = torch.Generator(device=device).manual_seed(0)
    features = torch.randn(bank, dim, device=device, generator=generator)
    labels = torch.randint(0, 10, (bank,), device=device, generator=generator)
    query = torch.randn(queries, dim, device=device, generator=generator)
    seconds = 0.0
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        weighted_knn_scores(query, features, labels, 10, k=200).argmax(1)
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds


CIFAR10_EVAL_IMAGES = 50_000 + 3 * 10_000  # the kNN bank, and the test images clean, triggered and with the control


def channels_last_views(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as ``data.channels_last`` hands it to the step: NHWC views."""
    return {**batch, "views": [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]}


def with_device_transform(result: dict[str, Any], rate: float, name: str) -> None:
    """The step's images/s with the device transform's time per step added, into ``result``."""
    images = result["images_per_step"]
    step_s = images / result["images_per_s_median"]
    result[f"device_{name}_per_s"] = rate
    result[f"images_per_s_with_device_{name}"] = images / (step_s + images / rate)


def measure(
    label,
    build,
    loss_fn,
    batches,
    images_per_step,
    args,
    device,
    precision,
    repeats,
    flops=None,
    compiled=False,
    profile_steps=0,
    discard_first=False,
    **trainer_options,
) -> dict[str, Any]:
    """``flops``: the count from another setting of the same model and batch (a compiled model is not counted).
    ``profile_steps``: profile that many steps after the timed ones of the last run (``step_profile``)."""
    flops = flops or count_flops(build, loss_fn, batches[0], device, precision)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    runs, window = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if discard_first:  # the process's first fit pays one-time costs (kernels loaded, allocator, oneDNN/cuDNN handles)
        lightning_run(build, batches, args.warmup, 1, accelerator=accelerator, precision=precision, **trainer_options)
    for repeat in range(repeats):
        extra = {}
        if profile_steps and repeat == repeats - 1:
            window = ProfileWindow(warmup + args.steps, warmup + args.steps + profile_steps, device)
            extra = {"callbacks": (window,), "extra_steps": profile_steps}
        runs.append(
            lightning_run(
                build,
                batches,
                warmup,
                args.steps,
                accelerator=accelerator,
                precision=precision,
                **extra,
                **trainer_options,
            )
        )
    steps = Series("steps/s", [r["wall"] for r in runs])
    peak, peak_source = peak_tflops(device, precision, args.peak_tflops)
    mfu = Series("mfu", [flops * s / (peak * 1e12) for s in steps.values]) if peak else None
    result = {
        "case": label,
        "flops_per_step": flops,
        "images_per_step": images_per_step,
        "steps_per_s": steps.values,
        "images_per_s_median": steps.median * images_per_step,
        "achieved_tflops_median": flops * steps.median / 1e12,
        "peak": peak_source,
        "mfu": mfu.values if mfu else None,
        "fit_overhead_s": [r["fit_overhead_s"] for r in runs],  # Trainer start-up and end (a compilation included)
        "module": runs[-1]["module"],  # the trained module (evaluation estimate); not written to the JSON
    }
    if device.type == "cuda":  # what the step needs (a larger batch's cost): the most allocated at once, GiB
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if window is not None:
        result["profile"] = summarise(window, profile_steps)
    result["row"] = [
        label,
        f"{flops / 1e9:.1f}",
        f"{steps.median * images_per_step:.0f} ({min(steps.values) * images_per_step:.0f}.."
        f"{max(steps.values) * images_per_step:.0f})",
        f"{flops * steps.median / 1e12:.3g}",
        f"{mfu.median:.1%} ({min(mfu.values):.1%}..{max(mfu.values):.1%})" if mfu else "n/a",
    ]
    print(f"  {label}: {result['row'][2]} images/s, MFU {result['row'][4]} ({peak_source})", flush=True)
    return result


# ---- two at once -------------------------------------------------------------------------------------------------
PAIR_WORKER_START_S = 30.0  # a fresh process's start before its first step: imports, CUDA context, batches, Trainer


class PairBarrier(L.Callback):
    """In a two-at-once process: after the warm-up (at the end of step ``first - 1``, before the timed steps'
    clock reads), writes its ready file and waits for the go file, so both processes' timed steps overlap; records
    the wall clock (shared by the processes) at the start of step ``first`` and of step ``last``."""

    def __init__(self, first: int, last: int, ready: Path, go: Path, device: torch.device, wait_s: float):
        self.first, self.last, self.ready, self.go, self.device, self.wait_s = first, last, ready, go, device, wait_s
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self.start is None:
            _sync(self.device)
            self.ready.touch()
            deadline = time.monotonic() + self.wait_s
            while not self.go.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no go in {self.go.parent} within {self.wait_s:.0f} s")
                time.sleep(0.002)
            self.start = time.time()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.last:
            _sync(self.device)
            self.end = time.time()


def pair_worker(args, device: torch.device, precision: str) -> int:
    """One two-at-once process: the setting's training as ``simclr_case`` runs it, on the same cached batches, its
    timed steps started by the go file; writes ``PAIR_DIR/PAIR_NAME.json``."""
    batch, width = simclr_sizes(args.quick)
    index_file = cifar_like_shards(args, args.cache / "gpu_throughput", n=2 * batch, shards=1)
    batches = [to_device(b, device) for b in make_batches("simclr", index_file, batch, 2)]
    optimizer, optimizer_args = gpu_config_optimizer()
    values = knobs(args.pair_worker, optimizer, precision)
    views = [channels_last_views(b) for b in batches] if values["channels_last"] else batches
    warmup = max(1, args.warmup + (args.compile_warmup if args.pair_worker in COMPILED else 0))
    folder = args.pair_dir
    barrier = PairBarrier(
        warmup, warmup + args.pair_steps, folder / f"{args.pair_name}.ready", folder / "go", device, wait_s=600
    )
    run = lightning_run(
        simclr_builder(values, width, optimizer_args),
        views,
        warmup,
        args.pair_steps,
        callbacks=(barrier,),
        accelerator="cuda" if device.type == "cuda" else "cpu",
        precision=values["precision"],
        benchmark=values["benchmark"],
    )
    record = {"views_per_s": run["wall"] * 2 * batch, "start": barrier.start, "end": barrier.end}
    (folder / f"{args.pair_name}.json").write_text(json.dumps(record))
    return 0


def run_pair_workers(names: list[str], setting: str, folder: Path, seconds: float) -> list[dict[str, Any]]:
    """Starts one worker per name, gives the go when all are warm, waits for them (at most ``seconds`` in all);
    returns their records in order. A worker that fails or is late stops them all (RuntimeError)."""
    (folder / "go").unlink(missing_ok=True)
    worker = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--pair-worker", setting]
    logs, processes = {}, {}
    deadline = time.monotonic() + seconds
    try:
        for name in names:
            (folder / f"{name}.ready").unlink(missing_ok=True)
            logs[name] = (folder / f"{name}.log").open("w")
            command = [*worker, "--pair-dir", str(folder), "--pair-name", name]
            processes[name] = subprocess.Popen(command, stdout=logs[name], stderr=subprocess.STDOUT)

        def check() -> None:
            for name, process in processes.items():
                if process.poll() not in (None, 0):
                    tail = (folder / f"{name}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(f"process {name} exited {process.returncode}: {' '.join(tail)[:200]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"cut after {seconds:.0f} s")

        while not all((folder / f"{name}.ready").exists() for name in names):
            check()
            time.sleep(0.02)
        (folder / "go").touch()
        while any(process.poll() is None for process in processes.values()):
            check()
            time.sleep(0.02)
        check()
        return [json.loads((folder / f"{name}.json").read_text()) for name in names]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()


def two_at_once(fastest: dict[str, Any], args, seconds_left: float) -> dict[str, Any]:
    """The setting ``fastest`` trained by one process alone, then by two at once (``run_pair_workers``); the pair's
    aggregate views/s over one alone's, and the slowdown of an arm beside another."""
    setting, views_per_step = fastest["setting"], fastest["images_per_step"]
    step_s = views_per_step / fastest["images_per_s_median"]
    warmup = args.warmup + (args.compile_warmup if setting in COMPILED else 0)
    one = PAIR_WORKER_START_S + max(fastest["fit_overhead_s"]) + (warmup + args.pair_steps) * step_s
    estimate = 2 * one + args.pair_steps * step_s  # alone, then two that start together and share the device
    result: dict[str, Any] = {
        "setting": setting,
        "chosen": "the fastest SimCLR setting measured before it (the compiled ones are measured later)",
        "steps": args.pair_steps,
        "views_per_step": views_per_step,
        "estimate_s": estimate,
    }
    print(f"  two at once: {setting}, {args.pair_steps} timed steps per process, ~{estimate:.0f} s", flush=True)
    if estimate > seconds_left - 10:
        result["skipped"] = f"~{estimate:.0f} s does not fit the {seconds_left:.0f} s left of --time-limit"
        print(f"  two at once: skipped: {result['skipped']}", flush=True)
        return result
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="two_at_once_") as folder:
        try:
            (alone,) = run_pair_workers(["alone"], setting, Path(folder), seconds_left - 10)
            pair = run_pair_workers(["a", "b"], setting, Path(folder), seconds_left - 10 - (time.monotonic() - started))
        except RuntimeError as error:
            result["error"] = str(error)
            print(f"  two at once: FAILED {error}", flush=True)
            return result
    alone_s = args.pair_steps * views_per_step / alone["views_per_s"]
    span = max(p["end"] for p in pair) - min(p["start"] for p in pair)
    result.update(
        alone_views_per_s=alone["views_per_s"],
        pair_process_views_per_s=[p["views_per_s"] for p in pair],
        pair_span_s=span,
        pair_start_skew_s=max(p["start"] for p in pair) - min(p["start"] for p in pair),
        pair_views_per_s=2 * args.pair_steps * views_per_step / span,
        slowdown=span / alone_s,
        per_process_slowdown=[alone["views_per_s"] / p["views_per_s"] for p in pair],
        wall_s=time.monotonic() - started,
    )
    result["ratio"] = result["pair_views_per_s"] / alone["views_per_s"]
    print(f"  two at once: {pair_line(result)}", flush=True)
    return result


def pair_line(pair: dict[str, Any]) -> str:
    """One line for a two-at-once result (also the report's)."""
    if "ratio" not in pair:
        return f"{pair['setting']}: {pair.get('skipped') or 'FAILED ' + str(pair.get('error'))}"
    each = ", x".join(f"{x:.2f}" for x in pair["per_process_slowdown"])
    return (
        f"{pair['setting']}, {pair['steps']} steps each: one alone {pair['alone_views_per_s']:.0f} views/s, two at "
        f"once {pair['pair_views_per_s']:.0f} views/s together (x{pair['ratio']:.2f}); beside the other an arm takes "
        f"x{pair['slowdown']:.2f} as long (each process x{each})"
    )


def main() -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on cuda, else 32)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU, TFLOP/s")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 2 quick / 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 1 quick / 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["simclr", "clip"])
    parser.add_argument(
        "--simclr-settings",
        default=None,
        help=f"comma list of {', '.join(SIMCLR_SETTINGS)} (default: all on cuda, {','.join(CPU_DEFAULT)} on cpu)",
    )
    parser.add_argument(
        "--clip-settings",
        default=None,
        help=f"comma list of {', '.join(CLIP_SETTINGS)} (default: all on cuda, {','.join(CLIP_CPU_DEFAULT)} on cpu)",
    )
    parser.add_argument(
        "--measured",
        type=Path,
        default=None,
        help="a folder of earlier calls' JSONs (results/gpu_throughput): settings measured there on a device of "
        "the same name are not measured again (eager always is)",
    )
    parser.add_argument(
        "--run-epochs",
        type=int,
        default=20,
        help="the runs the fastest setting is chosen for: epochs each (20: configs/experiment/na_cifar10_gpu.yaml)",
    )
    parser.add_argument(
        "--profile-settings",
        default=None,
        help="comma list of settings to profile (default: eager,all on cuda, eager on cpu; 'none': no profile)",
    )
    parser.add_argument("--profile-steps", type=int, default=None, help="steps profiled (default 2 quick / 10)")
    parser.add_argument("--profile-md", type=Path, default=None, help="also write the profiles as markdown here")
    parser.add_argument("--eval-batch", type=int, default=None, help="evaluation batch (default 64 quick / 1024)")
    parser.add_argument(
        "--compile-warmup", type=int, default=10, help="extra untimed steps of the compiled run (its compilation)"
    )
    parser.add_argument(
        "--views",
        default="both",
        choices=["cpu", "device", "both"],
        help="also time SimCLR's views / CLIP's images made on the device (device/both; the step itself is the same)",
    )
    parser.add_argument(
        "--two-at-once",
        default="on",
        choices=["on", "off"],
        help="also train the fastest SimCLR setting in two processes at once vs one alone (on, the default)",
    )
    parser.add_argument(
        "--pair-steps", type=int, default=None, help="timed steps of each two-at-once process (3 x --steps)"
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds this script may take: two at once only if it fits"
    )
    # a two-at-once process (started by this script): the setting, the folder of its ready/go files, its name
    parser.add_argument("--pair-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair-name", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (and --quick) to check the script on a CPU", file=sys.stderr)
        return 2
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    settings = (
        args.simclr_settings or (",".join(SIMCLR_SETTINGS) if device.type == "cuda" else ",".join(CPU_DEFAULT))
    ).split(",")
    unknown = set(settings) - set(SIMCLR_SETTINGS)
    if unknown or not settings or "eager" not in settings:
        print(
            f"--simclr-settings: choose among {', '.join(SIMCLR_SETTINGS)}, eager included (the ratios' reference); "
            f"got {args.simclr_settings}",
            file=sys.stderr,
        )
        return 2
    clip_settings = (
        args.clip_settings or (",".join(CLIP_SETTINGS) if device.type == "cuda" else ",".join(CLIP_CPU_DEFAULT))
    ).split(",")
    if set(clip_settings) - set(CLIP_SETTINGS) or "eager" not in clip_settings:
        print(
            f"--clip-settings: choose among {', '.join(CLIP_SETTINGS)}, eager included (the ratios' reference); "
            f"got {args.clip_settings}",
            file=sys.stderr,
        )
        return 2
    if args.measured is not None and args.measured.exists() and not args.measured.is_dir():
        print(f"--measured: {args.measured} is not a folder", file=sys.stderr)
        return 2
    if device.type != "cuda" and set(settings) & CUDA_ONLY:
        print(f"--simclr-settings: {', '.join(set(settings) & CUDA_ONLY)} needs CUDA (fp16 autocast)", file=sys.stderr)
        return 2
    profiled = args.profile_settings or ("eager,all" if device.type == "cuda" else "eager")
    profiled = set() if profiled == "none" else set(profiled.split(","))
    quick = args.quick
    args.steps = args.steps or (2 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10)
    args.profile_steps = args.profile_steps or (2 if quick else 10)
    args.eval_batch = args.eval_batch or (64 if quick else 1024)
    repeats = args.repeats or (1 if quick else 3)
    args.pair_steps = args.pair_steps or 3 * args.steps
    for name in ("lightning.pytorch", "lightning.fabric", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*does not have many workers.*",
        ".*set_vital.*",
        ".*srun.*",
        ".*no `val_dataloader`.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", pattern)
    if args.pair_worker:
        return pair_worker(args, device, precision)

    def time_left() -> float:
        return float("inf") if args.time_limit is None else args.time_limit - (time.monotonic() - started)

    findings: dict[str, Any] = {}  # measurements beside the per-setting results: "two_at_once"

    info = machine()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print_machine(info)
    print(
        f"device {device} ({info.get('gpu', 'CPU')}), precision {precision}, warm-up {args.warmup} + "
        f"{args.steps} timed steps, {repeats} run(s) each"
    )
    out = args.cache / "gpu_throughput"
    results = []
    calls = earlier_calls(args.measured, info, quick)
    before = measured_before(calls)
    if calls:
        print(f"measured before on this device ({', '.join(c['file'] for c in calls)}), not measured again:")
        for (model, setting), where in sorted(before.items()):
            if setting != "eager":
                print(f"  {model} {setting} ({where})")

    def save() -> None:  # after each case: a cut keeps what came before
        write_partial(args.json, info, device, precision, quick, results, findings, calls, args.run_epochs)

    def wanted(model: str, setting: str) -> bool:
        return setting == "eager" or (model, setting) not in before

    if "simclr" not in args.skip:
        batch, width = simclr_sizes(quick)
        index_file = cifar_like_shards(args, out, n=2 * batch, shards=1)
        batches = [to_device(b, device) for b in make_batches("simclr", index_file, batch, 2)]
        name = f"SimCLR ResNet-18{f' width {width}' if width else ''} CIFAR 32 px, batch {batch}"
        view_rate = None
        if args.views in ("device", "both"):
            raw = [to_device(b, device) for b in make_batches("simclr", index_file, batch, 2, views_on_device=True)]
            view_rate = device_view_rate(raw, device, 32, args.steps)
            print(f"  device views: {view_rate:.0f} views/s alone", flush=True)

        optimizer, optimizer_args = gpu_config_optimizer()
        print(f"  SimCLR's optimiser as in {GPU_CONFIG.name}: {optimizer_args}", flush=True)
        bank, queries = (2048, 512) if quick else (50_000, 30_000)
        vote_s = knn_vote_seconds(device, bank, queries)
        print(f"  kNN vote, {queries} queries against a bank of {bank}: {vote_s:.3f} s", flush=True)
        eager_result: dict[str, Any] = {}

        def simclr_case(setting: str, flops: int | None = None) -> dict[str, Any] | None:
            values = knobs(setting, optimizer, precision)

            build_simclr = simclr_builder(values, width, optimizer_args)
            views = [channels_last_views(b) for b in batches] if values["channels_last"] else batches
            compiled = setting in COMPILED
            try:
                result = measure(
                    f"{name}, {setting}",
                    build_simclr,
                    simclr_loss,
                    views,
                    2 * batch,
                    args,
                    device,
                    values["precision"],
                    1 if compiled else repeats,
                    flops=flops,
                    compiled=compiled,
                    profile_steps=args.profile_steps if setting in profiled else 0,
                    discard_first=setting == "eager",  # the first case: the ratios' reference must not pay them
                    benchmark=values["benchmark"],
                )
                module = result.pop("module")
                eval_rate = eval_forward_rate(module, device, values, args.eval_batch, args.steps)
            except Exception as error:  # a setting that fails is a result; the other settings still run
                message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                print(f"  {name}, {setting}: FAILED {message}", flush=True)
                results.append({"case": f"{name}, {setting}", "model": "simclr", "setting": setting, "error": message})
                save()
                return None
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["model"] = "simclr"
            result["setting"] = setting
            result["knobs"] = values
            result["fit_args"] = fit_arguments(values)
            result["epoch_s_median"] = CIFAR10_TRAIN_VIEWS / result["images_per_s_median"]
            result["eval_forward_images_per_s"] = eval_rate
            result["knn_vote_s"] = vote_s * (3 * 10_000 / queries) * (50_000 / bank)  # scaled to CIFAR-10's sizes
            result["eval_s_estimate"] = CIFAR10_EVAL_IMAGES / eval_rate + result["knn_vote_s"]
            if setting == "eager":
                eager_result.update(result)
            if eager_result:
                result["ratio_vs_eager"] = result["images_per_s_median"] / eager_result["images_per_s_median"]
                result["eval_ratio_vs_eager"] = eval_rate / eager_result["eval_forward_images_per_s"]
            if view_rate is not None:
                with_device_transform(result, view_rate, "views")
                result["epoch_s_with_device_views"] = CIFAR10_TRAIN_VIEWS / result["images_per_s_with_device_views"]
            print(
                f"    x{result.get('ratio_vs_eager', float('nan')):.2f} eager; a CIFAR-10 epoch {result['epoch_s_median']:.2f} s"
                + (f" ({result['epoch_s_with_device_views']:.2f} s with device views)" if view_rate is not None else "")
                + f"; evaluation ~{result['eval_s_estimate']:.2f} s (forward {eval_rate:.0f} images/s)",
                flush=True,
            )
            if "profile" in result and args.profile_md:
                with args.profile_md.open("a") as file:
                    file.write(markdown(result["case"], result["profile"]) + "\n")
            results.append(result)
            save()
            return result

        if args.profile_md:
            args.profile_md.write_text(f"# Where the time goes ({info.get('gpu', 'CPU')}, {precision})\n\n")
        flops = None
        for setting in (s for s in SIMCLR_SETTINGS if s in settings and s not in COMPILED and wanted("simclr", s)):
            done = simclr_case(setting, flops)
            flops = flops or (done or {}).get("flops_per_step")
        measured = [r for r in results if r.get("model") == "simclr" and "error" not in r]
        pair_before = next((c for c in calls if (c.get("two_at_once") or {}).get("ratio")), None)
        if args.two_at_once == "on" and pair_before is not None:
            findings["two_at_once"] = {**pair_before["two_at_once"], "measured_in": pair_before["file"]}
            print(f"  two at once: measured in {pair_before['file']}: {pair_line(findings['two_at_once'])}", flush=True)
        elif args.two_at_once == "on" and measured:
            # Here, before CLIP and the compiled settings: the arms stage needs it more than those, and a compiled
            # setting would compile for a minute in each process.
            fastest = max(measured, key=lambda r: r["images_per_s_median"])
            findings["two_at_once"] = two_at_once(fastest, args, time_left())
            save()
    clip_case = None
    if "clip" not in args.skip:
        clip_batch, model_name = (32, "clip-tiny-vit") if quick else (256, "ViT-B-32")
        if quick:
            index_file = cifar_like_shards(args, out, n=2 * clip_batch, shards=1)
        else:
            index_file = large_image_shards(args, out, n=2 * clip_batch, shards=1)
        clip_batches = [
            to_device(b, device) for b in make_batches("clip", index_file, clip_batch, 2, model_name=model_name)
        ]
        clip_eager: dict[str, Any] = {}
        flops_at: dict[int, int] = {}  # per batch size: the compiled settings reuse their uncompiled twin's count

        def clip_case(setting: str) -> dict[str, Any] | None:
            values = clip_knobs(setting)
            batch = clip_batch * values["batch_factor"]
            batches = doubled(clip_batches) if values["batch_factor"] == 2 else clip_batches
            compiled = setting in CLIP_COMPILED
            label = f"CLIP {model_name}, batch {batch}, {setting}"

            def build_clip(compile_mode: str | None = values["compile_mode"]) -> CLIP:
                torch.manual_seed(0)
                return CLIP(
                    model_name=model_name,
                    optimizer_impl=values["optimizer_impl"],
                    compile=compile_mode is not None,
                    compile_mode=compile_mode or "default",
                )

            try:
                if batch not in flops_at:
                    flops_at[batch] = count_flops(lambda: build_clip(None), clip_loss, batches[0], device, precision)
                result = measure(
                    label,
                    build_clip,
                    clip_loss,
                    batches,
                    batch,
                    args,
                    device,
                    precision,
                    1 if compiled else repeats,
                    flops=flops_at[batch],
                    compiled=compiled,
                    profile_steps=args.profile_steps if setting in profiled else 0,
                    discard_first=setting == "eager" and "simclr" in args.skip,  # the process's first fit
                )
                result.pop("module")
            except Exception as error:  # a setting that fails is a result; the other settings still run
                message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
                print(f"  {label}: FAILED {message}", flush=True)
                results.append({"case": label, "model": "clip", "setting": setting, "error": message})
                save()
                return None
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result.update(model="clip", setting=setting, knobs=values, batch=batch)
            result["fit_args"] = clip_fit_arguments(values, batch)
            if setting == "eager":
                clip_eager.update(result)
            if clip_eager:
                result["ratio_vs_eager"] = result["images_per_s_median"] / clip_eager["images_per_s_median"]
            memory = f", peak memory {result['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in result else ""
            print(f"    x{result.get('ratio_vs_eager', float('nan')):.2f} eager{memory}", flush=True)
            if "profile" in result and args.profile_md:
                with args.profile_md.open("a") as file:
                    file.write(markdown(result["case"], result["profile"]) + "\n")
            results.append(result)
            save()
            return result

        eager = clip_case("eager")
        if eager is not None and args.views in ("device", "both"):
            raw = make_batches("clip", index_file, clip_batch, 2, model_name=model_name, images_on_device=True)
            image_rate = device_image_rate([to_device(b, device) for b in raw], device, model_name, args.steps)
            with_device_transform(eager, image_rate, "images")
            print(
                f"  device images: {image_rate:.0f} images/s alone; step + images "
                f"{eager['images_per_s_with_device_images']:.0f} images/s",
                flush=True,
            )
        if eager is not None and device.type == "cuda":
            jpegs = [members["jpg"] for _, members in iter_samples(resolve_shards(str(index_file)))]
            decode = eager["jpeg_decode"] = decode_rates(jpegs, device, clip_batch, args.steps)
            nvjpeg = (
                f"{decode['nvjpeg_per_s']:.0f} images/s"
                if "nvjpeg_per_s" in decode
                else f"failed ({decode['nvjpeg_error']})"
            )
            print(
                f"  JPEG decode: nvjpeg {nvjpeg}, PIL on one core {decode['pil_one_core_per_s']:.0f} images/s; "
                f"faster: {decode.get('faster', 'n/a')}",
                flush=True,
            )
        save()
        for setting in (s for s in CLIP_SETTINGS if s in clip_settings and s != "eager" and s not in CLIP_COMPILED):
            if wanted("clip", setting):
                clip_case(setting)
    # Last: each compiles for a minute or more. Both "all"s first (the settings the runs would take), then compile
    # alone, CUDA graphs, and max-autotune (the slowest to compile).
    for model, setting in COMPILED_ORDER:
        if model == "simclr" and "simclr" not in args.skip and setting in settings and wanted(model, setting):
            simclr_case(setting, flops)
        if model == "clip" and clip_case is not None and setting in clip_settings and wanted(model, setting):
            clip_case(setting)
    simclr_rows = [r for r in results if r.get("model") == "simclr" and "error" not in r]
    print_settings(
        "SimCLR settings, each against eager in this call (epoch: 100k views at the step's rate, data ready):",
        "views/s",
        simclr_rows,
        {
            "epoch s": lambda r: f"{r['epoch_s_median']:.2f}",
            "evaluation s (est.)": lambda r: f"{r['eval_s_estimate']:.2f}",
        },
    )
    best = fastest_simclr(simclr_rows, calls, args.run_epochs)
    if best:
        print(
            f"fastest SimCLR setting for a {best['run_epochs']}-epoch run: {best['setting']} (~{best['run_s_estimate']:.0f} s "
            f"of training, {best['extra_start_s']:.0f} s of it compilation; {best['measured_in']}; {' '.join(best['fit_args'])})"
        )
    print_settings(
        "CLIP settings, each against eager in this call (images/s: image-text pairs):",
        "images/s",
        [r for r in results if r.get("model") == "clip" and "error" not in r],
        {"batch": lambda r: r["batch"], "peak memory GiB": lambda r: number(r.get("peak_memory_gib"), 1) or "n/a"},
    )
    pair = findings.get("two_at_once")
    if pair:
        print()
        print(f"Two at once: {pair_line(pair)}")
        if "ratio" in pair:
            print_table(
                ["setting", "steps each", "one alone views/s", "two at once views/s (sum)", "x one alone", "slowdown"],
                [
                    [
                        pair["setting"],
                        pair["steps"],
                        f"{pair['alone_views_per_s']:.0f}",
                        f"{pair['pair_views_per_s']:.0f}",
                        f"{pair['ratio']:.2f}",
                        f"{pair['slowdown']:.2f} ({', '.join(f'{x:.2f}' for x in pair['per_process_slowdown'])})",
                    ]
                ],
            )
    print()
    print("images/s: median (min..max) over runs; FLOPs counted by FlopCounterMode (forward + backward)")
    print_table(
        ["model", "GFLOPs/step", "images/s", "achieved TFLOP/s", "MFU"], [r["row"] for r in results if "row" in r]
    )
    load_at_end(info)
    save()
    return 0


def print_settings(title: str, rate: str, rows: list[dict[str, Any]], columns: dict[str, Any]) -> None:
    """One model's settings as a table: setting, rate, ratio to eager, MFU, the model's own ``columns`` (header ->
    cell of a result), compile + start seconds."""
    if not rows:
        return
    print()
    print(title)
    print_table(
        ["setting", rate, "x eager", "MFU", *columns, "compile + start s"],
        [
            [
                r["setting"],
                f"{r['images_per_s_median']:.0f}",
                f"{r.get('ratio_vs_eager', float('nan')):.2f}",
                mfu_text(r),
                *(cell(r) for cell in columns.values()),
                f"{max(r['fit_overhead_s']):.0f}",
            ]
            for r in rows
        ],
    )


def write_partial(path, info, device, precision, quick, results, findings, calls, run_epochs) -> None:
    payload = {
        "machine": info,
        "device": str(device),
        "precision": precision,
        "quick": quick,
        "measured_at": MEASURED_AT,
        "code": code_version(),
        "versions": library_versions(),
        "results": [{k: v for k, v in r.items() if k not in ("row", "module")} for r in results],
        **findings,  # "two_at_once"
    }
    # What a run should take: the SimCLR setting fastest against its own call's eager, this call's or an earlier one's.
    best = fastest_simclr([r for r in results if r.get("model") == "simclr"], calls, run_epochs)
    if best:
        payload["fastest_simclr_setting"] = best
    write_json(path, payload)


if __name__ == "__main__":
    sys.exit(main())
