"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo), through ``clbd fit`` as on a GPU node.

``tests.deepspeed_cpu.CPUDeepSpeedStrategy`` is Lightning's DeepSpeed strategy with its CUDA-only checks lifted
(DeepSpeed's own CPU accelerator, ``DS_ACCELERATOR=cpu``). Checked: the first steps' losses equal DDP's on the same
data, the run's checkpoint consolidates to an fp32 file that ``clbd test`` and a defense start from, and a
DeepSpeed run stopped mid-epoch resumes to the same weights as one that was not stopped.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clbd import main
from datamodules.shards import ShardSink
from lightning_modules.safe_checkpoint import load_checkpoint
from tests.conftest import png_bytes, solid_class_image

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # compared with DDP
# DeepSpeed reduces gradients in its own buckets (reduce-scatter of flat partitions), DDP in its own: on 2 ranks both
# sum the same two fp32 numbers and halve them, exactly. Measured on CPU: the first steps' losses are identical.
LOSS_RTOL = 1e-6
MODELS = {
    "simclr": [
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--model.optimizer=sgd",
        "--data=datamodules.SimCLRDataModule",
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=1",
        "--data.attack.rate=0.2",
        "--data.attack.reference_pool_size=10",
    ],
    "clip": [
        "--model=lightning_modules.CLIP",
        "--model.model_name=clip-tiny-vit",
        "--model.zero_shot_templates=cifar10",
        "--data=datamodules.CLIPDataModule",
        "--data.model_name=clip-tiny-vit",
        "--data.attack=poisoning.BadNet",
        "--data.attack.target_class=class1",
        "--data.attack.rate=0.2",
    ],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ds-shards")
    names = [f"class{c}" for c in range(4)]
    with ShardSink(folder, "train", maxcount=20, classes=names) as sink:
        for i in range(160):
            label = i % 4
            members = {"png": png_bytes(solid_class_image(label, i)), "cls": label, "txt": f"a photo of a class{label}"}
            sink.write(f"train{i:05d}", members)
    return folder / "train.index.json"


def fit(shards: Path, run: Path, model: str, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    """``clbd fit`` on 2 CPU processes; ``strategy`` is ``ddp`` or a ZeRO stage (``zero2`` / ``zero3``)."""
    if strategy == "ddp":
        chosen = ["--trainer.strategy=ddp"]
    else:
        chosen = [
            "--trainer.strategy=tests.deepspeed_cpu.CPUDeepSpeedStrategy",
            f"--trainer.strategy.stage={strategy[-1]}",
        ]
    command = [
        sys.executable,
        "-m",
        "clbd",
        "fit",
        *MODELS[model],
        *chosen,
        f"--data.train_shards={shards}",
        "--data.val_shards=null",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--data.shuffle_buffer=30",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def step_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss_step")]
    return [float(row["train/loss_step"]) for row in sorted(rows, key=lambda r: int(r["step"]))]


# Each run once per module, shared by the tests. SimCLR runs 12 steps, into its second epoch of 9 (ZeRO-2's is the
# straight run the resume test compares with); the schedule spans the run, so its DDP reference runs as long.
LENGTH = {
    "simclr": ["--trainer.max_steps=12", "--checkpoint.every_n_train_steps=3"],
    "clip": [f"--trainer.max_steps={STEPS}"],
}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    done: dict[tuple[str, str], Path] = {}

    def get(model: str, strategy: str) -> Path:
        if (model, strategy) not in done:
            run = tmp_path_factory.mktemp(f"{strategy}-{model}") / "run"
            result = fit(shards, run, model, strategy, *LENGTH[model])
            assert result.returncode == 0, result.stderr[-3000:]
            done[model, strategy] = run
        return done[model, strategy]

    return get


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("model", ["simclr", "clip"])
def test_deepspeed_matches_ddp_and_consolidates(runs, model, stage):
    run = runs(model, stage)
    losses, reference = step_losses(run)[:STEPS], step_losses(runs(model, "ddp"))[:STEPS]
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, rel=LOSS_RTOL)

    assert (run / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()  # DeepSpeed's per-rank folder
    consolidated = load_checkpoint(run / "consolidated" / "last.ckpt")
    weights = consolidated["state_dict"]
    assert weights and all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    assert consolidated["clbd_run_config"]["model"]["class_path"].lower().endswith(model)
    report = json.loads((run / "data_report.json").read_text())
    assert report["samples_seen"] == consolidated["global_step"] * 16


def test_consolidated_checkpoint_evaluates_and_starts_a_defense(shards, runs, tmp_path):
    """ZeRO-3 CLIP with BadNet -> consolidated fp32 file -> ``clbd test`` (zero-shot CA / ASR) and CleanCLIP."""
    run = runs("clip", "zero3")
    consolidated = run / "consolidated" / "last.ckpt"
    evaluation = [
        "test",
        *MODELS["clip"],
        f"--data.test_shards={shards}",
        "--data.train_shards=null",
        "--data.val_shards=null",
        "--data.num_workers=0",
        "--data.eval_batch_size=80",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'eval'}",
        "--ckpt_path",
        str(consolidated),
    ]
    assert main(evaluation) == 0
    metrics = json.loads((consolidated.parent / "metrics.json").read_text())["last.ckpt"]
    assert 0.0 <= metrics["clean_accuracy_top1"] <= 1.0 and metrics["asr_top1"] is not None

    attack = tmp_path / "badnet.yaml"
    attack.write_text(
        "data:\n  init_args:\n    attack:\n"
        "      class_path: poisoning.BadNet\n      init_args: {target_class: class1, rate: 0.2}\n"
    )
    defense = [
        "fit",
        "--config",
        str(ROOT / "configs" / "defense" / "cleanclip.yaml"),
        "--config",
        str(attack),
        f"--model.init_args.checkpoint={run / 'checkpoints' / 'last.ckpt'}",  # the folder: its fp32 copy is used
        "--model.init_args.model_name=clip-tiny-vit",
        "--model.init_args.zero_shot_templates=cifar10",
        "--data.init_args.model_name=clip-tiny-vit",
        "--data.init_args.batch_size=16",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        "--data.init_args.num_workers=0",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'cleanclip'}",
    ]
    assert main(defense) == 0
    results = json.loads((tmp_path / "cleanclip" / "defense_metrics.json").read_text())
    assert results["poisoned_checkpoint"].endswith("last.ckpt")
    assert results["before"]["clean_accuracy_top1"] == pytest.approx(metrics["clean_accuracy_top1"])


def test_deepspeed_resume_mid_epoch_is_exact(shards, runs, tmp_path):
    """Stopped after step 7 (checkpoint at step 6, mid-epoch 0 of 9 steps) and resumed into epoch 1: the same
    weights as the run that was not stopped."""
    straight, interrupted = runs("simclr", "zero2"), tmp_path / "interrupted"
    every = LENGTH["simclr"]
    stop = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=7"]
    killed = fit(shards, interrupted, "simclr", "zero2", *every, *stop)
    assert killed.returncode != 0 and "SimulatedPreemption" in killed.stderr
    resumed = fit(shards, interrupted, "simclr", "zero2", *every, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(straight / "consolidated" / "last.ckpt")
    b = load_checkpoint(interrupted / "consolidated" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    report_a = json.loads((straight / "data_report.json").read_text())
    report_b = json.loads((interrupted / "data_report.json").read_text())
    assert report_a["per_epoch"] == report_b["per_epoch"]  # every count once, not twice
