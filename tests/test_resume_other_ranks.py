"""Resume on another number of ranks (DDP and DeepSpeed, gloo): the rest of the interrupted epoch is dealt among the
new ranks, so over that epoch every sample is trained on exactly once; the next epoch is a fresh one of the new
layout. DeepSpeed's checkpoint goes through its universal form (``lightning_modules.deepspeed_setup``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules.shards import ShardSink
from lightning_modules.checkpoints import consolidate
from lightning_modules.safe_checkpoint import load_checkpoint
from tests.conftest import png_bytes, solid_class_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH = 128, 16  # 8 shards of 16: 8 steps per epoch on 1 or 2 ranks, 2 workers each, nothing dropped


def fit(shards: Path, run: Path, ranks: int, keys: Path, *extra: str, stage: int = 0) -> subprocess.CompletedProcess:
    """``clbd fit`` on ``ranks`` CPU processes: DDP, or DeepSpeed ZeRO ``stage`` when given."""
    if stage:
        strategy = ["--trainer.strategy=tests.deepspeed_cpu.CPUDeepSpeedStrategy", f"--trainer.strategy.stage={stage}"]
    else:
        strategy = [f"--trainer.strategy={'ddp' if ranks > 1 else 'auto'}"]
    command = [
        sys.executable,
        "-m",
        "clbd",
        "fit",
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--data=datamodules.SimCLRDataModule",
        f"--data.train_shards={shards}",
        "--data.val_shards=null",
        f"--data.batch_size={BATCH}",
        "--data.num_workers=2",
        "--data.shuffle_buffer=20",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={ranks}",
        *strategy,
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.every_n_train_steps=3",
        "--trainer.callbacks+=tests.callbacks.RecordKeys",
        f"--trainer.callbacks.folder={keys}",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT)) if stage else None
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def steps(folder: Path, until: int | None = None) -> list[dict]:
    rows = [json.loads(line) for file in sorted(folder.glob("rank*.jsonl")) for line in file.read_text().splitlines()]
    return [row for row in rows if until is None or row["step"] <= until]


def write_shards(folder: Path) -> Path:
    with ShardSink(folder, "train", maxcount=16, classes=[f"c{i}" for i in range(4)]) as sink:
        for i in range(SAMPLES):
            sink.write(f"k{i:04d}", {"png": png_bytes(solid_class_image(i % 4, i)), "cls": i % 4})
    return folder


def interrupt_and_resume(tmp_path: Path, before: int, after: int, stage: int = 0, options=(), resume=()):
    """A run on ``before`` ranks killed after step 4 (checkpoint at step 3), resumed on ``after`` ranks (both with
    ``options``; the resume with ``resume`` too)."""
    shards, run = write_shards(tmp_path / "shards"), tmp_path / "run"
    stop = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=4"]
    killed = fit(shards, run, before, tmp_path / "keys-before", *options, *stop, stage=stage)
    assert killed.returncode != 0 and "SimulatedPreemption" in killed.stderr, killed.stderr[-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(consolidate(checkpoint))["state_dict"] if stage else None
    ckpt = ["--ckpt_path", str(checkpoint)]
    resumed = fit(shards, run, after, tmp_path / "keys-after", *options, *ckpt, *resume, stage=stage)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming on another number of ranks" in resumed.stderr
    return run, resumed, saved


def assert_each_sample_once(tmp_path: Path) -> None:
    first = steps(tmp_path / "keys-before", until=3)  # the checkpoint is step 3's: step 4 is trained again
    second = steps(tmp_path / "keys-after")
    epoch0 = Counter(k for row in first + [r for r in second if r["epoch"] == 0] for k in row["keys"])
    epoch1 = Counter(k for row in second if row["epoch"] == 1 for k in row["keys"])
    everything = {f"k{i:04d}" for i in range(SAMPLES)}
    assert set(epoch0) == everything and set(epoch0.values()) == {1}  # none lost, none twice
    assert set(epoch1) == everything and set(epoch1.values()) == {1}  # a fresh epoch of the new layout
    assert max(r["step"] for r in second) == 2 * SAMPLES // BATCH  # the schedule's length is unchanged


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_takes_each_sample_once(tmp_path, before, after):
    run, _, _ = interrupt_and_resume(tmp_path, before, after)
    assert_each_sample_once(tmp_path)
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 2 * SAMPLES // BATCH


@pytest.mark.parametrize("before, after, stage", [(2, 1, 2), (1, 2, 2), (2, 1, 3)])
def test_deepspeed_resume_on_another_number_of_ranks_goes_through_a_universal_checkpoint(
    tmp_path, before, after, stage
):
    """The checkpoint written by ``before`` ranks is converted once to DeepSpeed's universal form beside the run and
    loaded on ``after`` ranks with the saved weights (batch-norm statistics included); over the interrupted epoch
    each sample once. AdamW: the universal checkpoint carries Adam's state only."""
    pytest.importorskip("deepspeed")
    weights = tmp_path / "weights-after-load.pt"
    record = ["--trainer.callbacks+=tests.callbacks.RecordWeights", f"--trainer.callbacks.path={weights}"]
    run, resumed, saved = interrupt_and_resume(tmp_path, before, after, stage, ["--model.optimizer=adamw"], record)
    said = f"was written by {before} data-parallel ranks and is resumed on {after}"
    assert resumed.stderr.count(said) == 1, resumed.stderr[-3000:]  # rank 0 converts, once
    universal = run / "universal" / "last.ckpt"
    assert (universal / "latest_universal").read_text() == "checkpoint"
    assert (universal / "checkpoint" / "zero").is_dir()
    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved.keys() == loaded.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name
    assert_each_sample_once(tmp_path)
    final = load_checkpoint(run / "consolidated" / "last.ckpt")
    assert final["global_step"] == 2 * SAMPLES // BATCH


def test_deepspeed_resume_on_another_number_of_ranks_refuses_a_non_adam_optimizer(tmp_path):
    """SGD's or LARS's momentum has no place in DeepSpeed's universal checkpoint: refused before any compute."""
    from lightning_modules.deepspeed_setup import resume_on_other_ranks

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (checkpoint / "checkpoint").mkdir(parents=True)
    (checkpoint / "latest").write_text("checkpoint")
    state = {"optimizer_state_dict": {"base_optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(4)}}}}}
    for rank in range(2):
        torch.save(state, checkpoint / "checkpoint" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="written by 2 DeepSpeed ranks, resumed on 1.*holds momentum_buffer"):
        resume_on_other_ranks(strategy=None, checkpoint=checkpoint, world_size=1)
    assert not (tmp_path / "run" / "universal").exists()
