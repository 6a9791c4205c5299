"""Resume on another number of ranks (DDP, gloo): the rest of the interrupted epoch is dealt among the new ranks, so
over that epoch every sample is trained on exactly once; the next epoch is a fresh one of the new layout."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from datamodules.shards import ShardSink
from tests.conftest import png_bytes, solid_class_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLES, BATCH = 128, 16  # 8 shards of 16: 8 steps per epoch on 1 or 2 ranks, 2 workers each, nothing dropped


def fit(shards: Path, run: Path, ranks: int, keys: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "lightning_modules.cli",
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
        f"--trainer.strategy={'ddp' if ranks > 1 else 'auto'}",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--checkpoint.every_n_train_steps=3",
        "--trainer.callbacks+=tests.callbacks.RecordKeys",
        f"--trainer.callbacks.folder={keys}",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def steps(folder: Path, until: int | None = None) -> list[dict]:
    rows = [json.loads(line) for file in sorted(folder.glob("rank*.jsonl")) for line in file.read_text().splitlines()]
    return [row for row in rows if until is None or row["step"] <= until]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_takes_each_sample_once(tmp_path, before, after):
    shards = tmp_path / "shards"
    with ShardSink(shards, "train", maxcount=16, classes=[f"c{i}" for i in range(4)]) as sink:
        for i in range(SAMPLES):
            sink.write(f"k{i:04d}", {"png": png_bytes(solid_class_image(i % 4, i)), "cls": i % 4})
    run = tmp_path / "run"
    stop = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=4"]
    killed = fit(shards, run, before, tmp_path / "keys-before", *stop)
    assert killed.returncode != 0 and "SimulatedPreemption" in killed.stderr
    resumed = fit(shards, run, after, tmp_path / "keys-after", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming on another number of ranks" in resumed.stderr

    first = steps(tmp_path / "keys-before", until=3)  # the checkpoint is step 3's: step 4 is trained again
    second = steps(tmp_path / "keys-after")
    epoch0 = Counter(k for row in first + [r for r in second if r["epoch"] == 0] for k in row["keys"])
    epoch1 = Counter(k for row in second if row["epoch"] == 1 for k in row["keys"])
    everything = {f"k{i:04d}" for i in range(SAMPLES)}
    assert set(epoch0) == everything and set(epoch0.values()) == {1}  # none lost, none twice
    assert set(epoch1) == everything and set(epoch1.values()) == {1}  # a fresh epoch of the new layout
    assert max(r["step"] for r in second) == 2 * SAMPLES // BATCH  # the schedule's length is unchanged
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 2 * SAMPLES // BATCH
