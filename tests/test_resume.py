"""Exact resume: stop a poisoned run mid-epoch after a checkpoint, resume it, and match an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clbd import main
from clbd.run_dir import config_differences
from tests.callbacks import SimulatedPreemption


def common_args(shards: Path, run: Path, model: list[str], data: list[str], attack: list[str]) -> list[str]:
    return [
        *model,
        *data,
        *attack,
        f"--data.train_shards={shards}/train.index.json",
        "--data.val_shards=null",
        "--data.num_workers=2",
        "--data.shuffle_buffer=40",
        "--trainer.max_epochs=2",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=3",
        f"--trainer.default_root_dir={run}",
    ]


SIMCLR = (
    ["--model=lightning_modules.SimCLR", "--model.width=8", "--model.proj_hidden_dim=32", "--model.optimizer=lars"],
    ["--data=datamodules.SimCLRDataModule", "--data.batch_size=16"],
    [
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=1",
        "--data.attack.rate=0.2",
        "--data.attack.reference_pool_size=10",
    ],
)
# The same run as the GPU config makes it: views made after the transfer (datamodules.device_views) from shards
# decoded once into memory (datamodules.resident): resumes exactly too.
SIMCLR_DEVICE_VIEWS = (SIMCLR[0], [*SIMCLR[1], "--data.views_on_device=true", "--data.resident=true"], SIMCLR[2])
# The other image methods, narrow heads, NA on: their momentum networks, MoCo's queue and pointer, and SimSiam's
# fixed-rate predictor group must resume exactly too.
IMAGE_DATA = ["--data=datamodules.SimCLRDataModule", "--data.batch_size=16"]
MOCO_V2 = (
    ["--model=lightning_modules.MoCoV2", "--model.width=8", "--model.proj_hidden_dim=32", "--model.queue_size=64"],
    IMAGE_DATA,
    SIMCLR[2],
)
BYOL = (["--model=lightning_modules.BYOL", "--model.width=8", "--model.proj_hidden_dim=32"], IMAGE_DATA, SIMCLR[2])
SIMSIAM = (
    [
        "--model=lightning_modules.SimSiam",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--model.proj_output_dim=32",
    ],
    IMAGE_DATA,
    SIMCLR[2],
)
CLIP = (
    ["--model=lightning_modules.CLIP", "--model.model_name=clip-tiny-vit"],
    ["--data=datamodules.CLIPDataModule", "--data.model_name=clip-tiny-vit", "--data.batch_size=16"],
    ["--data.attack=poisoning.BadNet", "--data.attack.target_class=banana", "--data.attack.rate=0.2"],
)

# CLIP with its training images made after the transfer (datamodules.device_clip).
CLIP_DEVICE_IMAGES = (CLIP[0], [*CLIP[1], "--data.images_on_device=true"], CLIP[2])


@pytest.mark.parametrize(
    "method",
    [SIMCLR, SIMCLR_DEVICE_VIEWS, MOCO_V2, BYOL, SIMSIAM, CLIP, CLIP_DEVICE_IMAGES],
    ids=["simclr", "simclr_device_views", "moco_v2", "byol", "simsiam", "clip", "clip_device_images"],
)
def test_resume_mid_epoch_is_bitwise_exact(tmp_path, make_shards, method):
    model, data, attack = method
    shards = make_shards(n=160, per_shard=40, captions=True)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    assert main(["fit", *common_args(shards, straight, model, data, attack)]) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=13"]
    with pytest.raises(SimulatedPreemption):
        main(["fit", *common_args(shards, interrupted, model, data, attack), *interrupt])
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").glob("*.ckpt"))
    assert "epoch=1-step=12.ckpt" in checkpoints  # mid-epoch: 9 or 10 steps per epoch (NA's pool leaves the stream)
    assert not (interrupted / "fit_finished.json").exists()
    resume = ["--ckpt_path", str(interrupted / "checkpoints" / "epoch=1-step=12.ckpt")]
    assert main(["fit", *common_args(shards, interrupted, model, data, attack), *resume]) == 0

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] >= 18
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["clbd_counters"] == b["clbd_counters"]  # poisoned samples seen, skips: counted once, not twice
    if method is MOCO_V2:  # the queue, its pointer and the key encoder are in the state compared above
        assert {"queue", "queue_ptr", "momentum_encoder.conv1.weight"} <= a["state_dict"].keys()
        assert int(a["state_dict"]["queue_ptr"]) == (16 * a["global_step"]) % 64


def test_resume_with_a_different_config_is_refused(tmp_path, make_shards):
    model, data, attack = SIMCLR
    shards = make_shards(n=160, per_shard=40)
    run = tmp_path / "run"
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=4"]
    # The preempted run dies in its own process, as it would on a cluster.
    preempted = subprocess.run(
        [
            sys.executable,
            "-m",
            "clbd",
            "fit",
            *common_args(shards, run, model, data, attack),
            *interrupt,
        ],
        capture_output=True,
        text=True,
    )
    assert "SimulatedPreemption" in preempted.stderr and (run / "checkpoints" / "last.ckpt").exists()
    changed = [*common_args(shards, run, model, data, attack), "--model.temperature=0.2"]
    resume = ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    assert main(["fit", *changed, *resume]) == 2
    assert main(["fit", *common_args(shards, run, model, data, attack)]) == 2  # no --ckpt_path: refused too


def test_config_differences_name_the_field():
    saved = {
        "model": {"class_path": "x", "init_args": {"lr": 0.1}},
        "data": {"init_args": {"eval_batch_size": 8, "num_workers": 2, "shuffle_buffer": 40}},
    }
    now = {
        "model": {"class_path": "x", "init_args": {"lr": 0.2}},
        "data": {"init_args": {"eval_batch_size": 16, "num_workers": 0, "shuffle_buffer": 80}},
    }
    assert config_differences(saved, now) == [
        "model.lr: checkpoint 0.1, now 0.2",
        "data.shuffle_buffer: checkpoint 40, now 80",  # another sample order: refused; the worker count is not
    ]


def test_resume_with_another_number_of_workers_takes_each_sample_once(tmp_path, make_shards):
    """A mid-epoch checkpoint of 2 loader workers resumed with 1 (and another progress bar, logging cadence and
    evaluation batch size): the rest of the epoch is dealt anew, each sample once; the next epoch is a fresh run's."""
    model, data, attack = SIMCLR
    shards = make_shards(n=160, per_shard=40)
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    keys = ["--trainer.callbacks+=tests.callbacks.RecordKeys", f"--trainer.callbacks.folder={run / 'keys'}"]
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=5"]
    with pytest.raises(SimulatedPreemption):
        main(["fit", *common_args(shards, run, model, data, attack), *keys, *interrupt])
    other = ["--data.num_workers=1", "--data.eval_batch_size=8", "--trainer.enable_progress_bar=true"]
    other += ["--trainer.log_every_n_steps=1"]
    resume = ["--ckpt_path", str(run / "checkpoints" / "epoch=0-step=3.ckpt")]
    assert main(["fit", *common_args(shards, run, model, data, attack), *keys, *other, *resume]) == 0
    fresh_keys = ["--trainer.callbacks+=tests.callbacks.RecordKeys", f"--trainer.callbacks.folder={fresh / 'keys'}"]
    assert main(["fit", *common_args(shards, fresh, model, data, attack), *fresh_keys, "--data.num_workers=1"]) == 0

    def epochs(folder: Path) -> dict[int, list[str]]:
        steps = {r["step"]: r for r in map(json.loads, (folder / "keys" / "rank0.jsonl").read_text().splitlines())}
        out: dict[int, list[str]] = {}
        for step in sorted(steps):
            out.setdefault(steps[step]["epoch"], []).extend(steps[step]["keys"])
        return out

    resumed, reference = epochs(run), epochs(fresh)
    assert len(resumed[0]) == len(set(resumed[0])) == len(reference[0])  # each sample of the epoch once, all steps
    assert resumed[1] == reference[1]  # later epochs: a fresh run on the new layout
    report = json.loads((run / "data_report.json").read_text())
    assert [e["samples_seen"] for e in report["per_epoch"]] == [len(resumed[0]), len(resumed[1])]
