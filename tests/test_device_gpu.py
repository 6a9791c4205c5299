"""The GPU path on a GPU (marked ``gpu``; run by benchmarks/gpu_check.sh): SimCLR's views and CLIP's images made on
CUDA equal the same transforms run on the CPU (where CI tests them against torchvision and open_clip), the GPU
config's settings fit and ``clbd test`` a poisoned run end to end on CUDA (bf16, channels-last, cuDNN autotuning,
views on the device, resident shards, replayed evaluation batches), and a compiled encoder trains like the eager one.

Each body takes the device as an argument, so the same code can be run on a CPU by hand
(``python -c "from tests.test_device_gpu import *; ..."``)."""

from __future__ import annotations

import json

import pytest
import torch

from clbd import main
from datamodules.device_clip import DeviceCLIPImagesHook
from datamodules.device_views import DeviceViewsHook
from datamodules.stream import default_collate
from datamodules.views import CLIPPreprocess, SimCLRAugmentation
from lightning_modules import SimCLR
from tests.test_device_clip import generated_images
from tests.test_device_views import images_and_keys

pytestmark = pytest.mark.gpu


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_views_match_the_cpu(device: str) -> None:
    hook = DeviceViewsHook(SimCLRAugmentation(image_size=32, blur_p=0.5), seed=3)
    items = [hook.item({"image": image, "__key__": key, "label": 0}, 1) for image, key in images_and_keys(64)]
    batch = hook.collate(default_collate)(items)
    on_cpu = hook.finish(dict(batch))["views"]
    on_device = hook.finish(to(batch, device))["views"]  # the sync-free variant on a GPU
    for ours, reference in zip(on_device, on_cpu):
        assert ours.device.type == torch.device(device).type and ours.dtype == torch.float32
        assert (ours.cpu() - reference).abs().max() < 1e-4


def clip_images_match_the_cpu(device: str) -> None:
    for model_name, train in (("ViT-B-32", True), ("ViT-B-32", False)):
        hook = DeviceCLIPImagesHook(CLIPPreprocess(model_name, train=train, seed=5))
        items = [hook.item({"image": image, "__key__": f"k{i}"}, 2) for i, image in enumerate(generated_images())]
        batch = hook.collate(default_collate)(items)
        on_cpu = hook.finish(dict(batch))["image"]
        on_device = hook.finish(to(batch, device))["image"]
        assert on_device.device.type == torch.device(device).type
        assert (on_device.cpu() - on_cpu).abs().max() < 1e-4, (model_name, train)


def gpu_config_fits_and_tests(tmp_path, make_shards, accelerator: str, precision: str) -> None:
    """configs/pretrain/simclr_cifar10_gpu.yaml + NA, shrunk to a tiny run; then clbd test on its checkpoint (the
    linear probe's ASR on the device's features failed here once)."""
    train = make_shards(n=256, per_shard=64)
    val = make_shards(n=64, per_shard=64, prefix="val")
    run = tmp_path / "run"
    shrink = [
        f"--trainer.accelerator={accelerator}",
        f"--trainer.precision={precision}",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        "--model.init_args.width=8",
        "--model.init_args.proj_hidden_dim=64",
        "--model.init_args.probe_epochs=2",
        "--model.init_args.probe_min_steps=10",
        f"--data.init_args.train_shards={train}/train.index.json",
        f"--data.init_args.val_shards={val}/val.index.json",
        "--data.init_args.batch_size=32",
        "--data.init_args.eval_batch_size=64",
        "--data.init_args.num_workers=2",
        "--data.init_args.knn_bank_size=128",
        "--data.init_args.attack.init_args.count=16",
        "--data.init_args.attack.init_args.reference_pool_size=8",
    ]
    configs = ["--config", "configs/pretrain/simclr_cifar10_gpu.yaml", "--config", "configs/attack/na_cifar10.yaml"]
    assert main(["fit", *configs, *shrink]) == 0
    saved = json.loads((run / "data_report.json").read_text())
    assert saved["poisoned"] > 0
    test = ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    assert main(test) == 0
    metrics = json.loads((run / "checkpoints" / "metrics.json").read_text())["last.ckpt"]
    assert metrics["knn"]["asr"] is not None and metrics["linear_probe"]["asr"] is not None


def compiled_encoder_trains_like_eager(device: str) -> None:
    views = [torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(v)).to(device) for v in (1, 2)]
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = SimCLR(width=16, proj_hidden_dim=64, channels_last=True, compile=compiled).to(device)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
        losses[compiled] = []
        for _ in range(3):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = model.method_loss(*views)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses[compiled].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)  # bf16: fused kernels round differently


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return "cuda"


def test_device_views_on_cuda_equal_the_cpu(cuda):
    device_views_match_the_cpu(cuda)


def test_clip_images_on_cuda_equal_the_cpu(cuda):
    clip_images_match_the_cpu(cuda)


def test_gpu_config_fits_and_tests_a_poisoned_run_on_cuda(cuda, tmp_path, make_shards):
    gpu_config_fits_and_tests(tmp_path, make_shards, "gpu", "bf16-mixed")


def test_compiled_encoder_trains_like_the_eager_one_on_cuda(cuda):
    compiled_encoder_trains_like_eager(cuda)
