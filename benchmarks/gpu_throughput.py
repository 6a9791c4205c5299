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

SimCLR's step under three settings (``--simclr-settings``), the same model, batches and FLOPs:

* ``eager``: NCHW views and weights, cuDNN's heuristic algorithm choice (Lightning's default);
* ``tuned``: what ``configs/pretrain/simclr_cifar10_gpu.yaml`` sets: channels-last views and encoder weights
  (``data.channels_last``, ``model.channels_last``) and cuDNN autotuning (``trainer.benchmark``);
* ``compiled``: ``tuned`` plus ``torch.compile`` of the encoder (``model.compile``), one run, its compilation in the
  warm-up and reported as the run's overhead. Run last: on a GPU it takes a minute or more.

Default: all three on CUDA; ``eager,tuned`` on a CPU.

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

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import time  # noqa: E402

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
from benchmarks.training_step import clip_loss, lightning_run, make_batches, simclr_loss  # noqa: E402
from datamodules.decode import decode_image  # noqa: E402
from datamodules.device_clip import DeviceCLIPImagesHook  # noqa: E402
from datamodules.device_views import DeviceViewsHook  # noqa: E402
from datamodules.faults import FaultCounter  # noqa: E402
from datamodules.shards import resolve_shards  # noqa: E402
from datamodules.views import CLIPPreprocess, SimCLRAugmentation  # noqa: E402
from lightning_modules.clip import CLIP  # noqa: E402
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
    if device.type != "cuda" or "bf16" not in precision:
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


SIMCLR_SETTINGS = ("eager", "tuned", "compiled")


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
    label, build, loss_fn, batches, images_per_step, args, device, precision, repeats, flops=None, **trainer_options
) -> dict[str, Any]:
    """``flops``: the count from another setting of the same model and batch (a compiled model is not counted)."""
    flops = flops or count_flops(build, loss_fn, batches[0], device, precision)
    accelerator = "cuda" if device.type == "cuda" else "cpu"
    warmup = args.warmup + (args.compile_warmup if trainer_options.pop("compiled", False) else 0)
    runs = [
        lightning_run(
            build, batches, warmup, args.steps, accelerator=accelerator, precision=precision, **trainer_options
        )
        for _ in range(repeats)
    ]
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
    }
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
        help="comma list of eager, tuned, compiled (default: all three on cuda, eager,tuned on cpu)",
    )
    parser.add_argument(
        "--compile-warmup", type=int, default=10, help="extra untimed steps of the compiled run (its compilation)"
    )
    parser.add_argument(
        "--views",
        default="both",
        choices=["cpu", "device", "both"],
        help="also time SimCLR's views / CLIP's images made on the device (device/both; the step itself is the same)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu (and --quick) to check the script on a CPU", file=sys.stderr)
        return 2
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    settings = (args.simclr_settings or ("eager,tuned,compiled" if device.type == "cuda" else "eager,tuned")).split(",")
    if set(settings) - set(SIMCLR_SETTINGS) or not settings:
        print(
            f"--simclr-settings: choose among {', '.join(SIMCLR_SETTINGS)}, got {args.simclr_settings}", file=sys.stderr
        )
        return 2
    quick = args.quick
    args.steps = args.steps or (2 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 10)
    repeats = args.repeats or (1 if quick else 3)
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
    if "simclr" not in args.skip:
        batch, width = (32, 8) if quick else (512, None)
        index_file = cifar_like_shards(args, out, n=2 * batch, shards=1)
        batches = [to_device(b, device) for b in make_batches("simclr", index_file, batch, 2)]
        name = f"SimCLR ResNet-18{f' width {width}' if width else ''} CIFAR 32 px, batch {batch}"
        view_rate = None
        if args.views in ("device", "both"):
            raw = [to_device(b, device) for b in make_batches("simclr", index_file, batch, 2, views_on_device=True)]
            view_rate = device_view_rate(raw, device, 32, args.steps)
            print(f"  device views: {view_rate:.0f} views/s alone", flush=True)

        def simclr_case(setting: str, flops: int | None = None) -> dict[str, Any]:
            tuned = setting != "eager"

            def build_simclr() -> SimCLR:
                torch.manual_seed(0)
                return SimCLR(
                    backbone="resnet18",
                    width=width,
                    cifar_stem=True,
                    channels_last=tuned,
                    compile=setting == "compiled",
                )

            views = [channels_last_views(b) for b in batches] if tuned else batches
            options = {"benchmark": True} if tuned else {}
            result = measure(
                f"{name}, {setting}",
                build_simclr,
                simclr_loss,
                views,
                2 * batch,
                args,
                device,
                precision,
                1 if setting == "compiled" else repeats,
                flops=flops,
                compiled=setting == "compiled",
                **options,
            )
            result["setting"] = setting
            result["epoch_s_median"] = CIFAR10_TRAIN_VIEWS / result["images_per_s_median"]
            if view_rate is not None:
                with_device_transform(result, view_rate, "views")
                result["epoch_s_with_device_views"] = CIFAR10_TRAIN_VIEWS / result["images_per_s_with_device_views"]
                print(
                    f"    step + device views {result['images_per_s_with_device_views']:.0f} images/s, a CIFAR-10 "
                    f"epoch {result['epoch_s_with_device_views']:.2f} s (ready views: {result['epoch_s_median']:.2f} s)",
                    flush=True,
                )
            results.append(result)
            write_partial(args.json, info, device, precision, quick, results)  # kept if a later case is cut short
            return result

        flops = None
        for setting in (s for s in SIMCLR_SETTINGS if s in settings and s != "compiled"):
            flops = simclr_case(setting, flops)["flops_per_step"]
    if "clip" not in args.skip:
        batch, model_name = (32, "clip-tiny-vit") if quick else (256, "ViT-B-32")
        if quick:
            index_file = cifar_like_shards(args, out, n=2 * batch, shards=1)
        else:
            index_file = large_image_shards(args, out, n=2 * batch, shards=1)
        batches = [to_device(b, device) for b in make_batches("clip", index_file, batch, 2, model_name=model_name)]
        label = f"CLIP {model_name}, batch {batch}"

        def build_clip() -> CLIP:
            torch.manual_seed(0)
            return CLIP(model_name=model_name)

        result = measure(label, build_clip, clip_loss, batches, batch, args, device, precision, repeats)
        results.append(result)
        write_partial(args.json, info, device, precision, quick, results)  # the step's numbers kept whatever follows
        if args.views in ("device", "both"):
            raw = make_batches("clip", index_file, batch, 2, model_name=model_name, images_on_device=True)
            image_rate = device_image_rate([to_device(b, device) for b in raw], device, model_name, args.steps)
            with_device_transform(result, image_rate, "images")
            print(
                f"  device images: {image_rate:.0f} images/s alone; step + images "
                f"{result['images_per_s_with_device_images']:.0f} images/s",
                flush=True,
            )
        if device.type == "cuda":
            jpegs = [members["jpg"] for _, members in iter_samples(resolve_shards(str(index_file)))]
            decode = result["jpeg_decode"] = decode_rates(jpegs, device, batch, args.steps)
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
        write_partial(args.json, info, device, precision, quick, results)
    if "simclr" not in args.skip and "compiled" in settings:
        simclr_case("compiled", flops)  # last: its compilation takes a minute or more
    print()
    print("images/s: median (min..max) over runs; FLOPs counted by FlopCounterMode (forward + backward)")
    print_table(["model", "GFLOPs/step", "images/s", "achieved TFLOP/s", "MFU"], [r["row"] for r in results])
    load_at_end(info)
    write_partial(args.json, info, device, precision, quick, results)
    return 0


def write_partial(path, info, device, precision, quick, results) -> None:
    payload = {
        "machine": info,
        "device": str(device),
        "precision": precision,
        "quick": quick,
        "results": [{k: v for k, v in r.items() if k != "row"} for r in results],
    }
    write_json(path, payload)


if __name__ == "__main__":
    sys.exit(main())
