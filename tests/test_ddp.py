"""Two ranks on CPU (gloo), launched by Lightning exactly as on a node: equal steps, one manifest, counts summed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from poisoning.plan import records_from_manifest


def test_ddp_two_ranks_poisoned_simclr(tmp_path, make_shards):
    shards = make_shards(n=200, per_shard=25)  # 8 shards: 2 ranks x 2 workers, uneven streams
    run = tmp_path / "run"
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
        f"--data.val_shards={shards}",
        "--data.max_val_samples=40",
        "--data.knn_bank_size=40",
        "--data.batch_size=16",
        "--data.num_workers=2",
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=0",
        "--data.attack.count=30",
        "--data.attack.reference_pool_size=10",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    per_rank_batches = (200 - 10) // 16  # the reference pool leaves the stream; 8 per rank per epoch
    assert checkpoint["global_step"] == 2 * per_rank_batches

    manifest = records_from_manifest(run / "poison_manifest.jsonl")
    assert len(manifest) == 30
    report = json.loads((run / "data_report.json").read_text())
    # Both ranks' streams are summed: across 2 epochs every poisoned key is seen once per epoch, unless it fell in a
    # worker's dropped remainder (at most batch-1 samples per worker per epoch).
    assert 2 * 30 - 2 * 4 * 15 <= report["poisoned_seen"] <= 2 * 30
    assert report["poisoned"] == report["poisoned_seen"]
    # The 10 reference images leave the stream once per epoch (a worker's extra passes count nothing).
    assert report["excluded"] == 2 * 10
    assert [e["excluded"] for e in report["per_epoch"]] == [10, 10]
    assert report["samples_seen"] == 2 * 2 * per_rank_batches * 8  # 2 epochs x 2 ranks x 8 batches x 8 per rank
    metrics = (run / "metrics.csv").read_text()
    assert "val/knn_acc" in metrics and "val/knn_asr" in metrics


def ddp_fit(shards, run, *extra):
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
        "--data.batch_size=16",
        "--data.num_workers=2",
        "--data.shuffle_buffer=30",
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=0",
        "--data.attack.rate=0.2",
        "--data.attack.reference_pool_size=10",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.every_n_train_steps=3",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])


def test_ddp_resume_restores_each_ranks_stream(tmp_path):
    """Ranks read different shards with different per-worker quotas; each must get its own stream back."""
    from datamodules.shards import ShardSink
    from tests.conftest import png_bytes, solid_class_image

    shards = tmp_path / "shards"
    sizes = [37, 11, 29, 23, 41, 17, 31, 19]  # uneven: workers and ranks get different quotas
    with ShardSink(shards, "train", maxcount=max(sizes), classes=[f"c{i}" for i in range(4)]) as sink:
        for shard, size in enumerate(sizes):
            for i in range(size):
                key = f"s{shard}_{i:03d}"
                sink.write(key, {"png": png_bytes(solid_class_image(i % 4, 100 * shard + i)), "cls": i % 4})
            sink._open_next()  # one tar per size (the sink otherwise fills shards to maxcount)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert ddp_fit(shards, straight).returncode == 0
    killed = ddp_fit(
        shards, interrupted, "--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=7"
    )
    assert killed.returncode != 0 and "SimulatedPreemption" in killed.stderr
    resumed = ddp_fit(shards, interrupted, "--ckpt_path", str(interrupted / "checkpoints" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["clbd_counters"] == b["clbd_counters"]


def test_ddp_two_ranks_moco_v2_queue_takes_the_global_batch(tmp_path, make_shards):
    """Through Lightning's DDP: each step enqueues the keys of both ranks (global batch 16 = 2 x 8)."""
    shards = make_shards(n=120, per_shard=30)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "clbd",
        "fit",
        "--model=lightning_modules.MoCoV2",
        "--model.width=4",
        "--model.proj_hidden_dim=16",
        "--model.queue_size=160",
        "--model.lr=0.06",
        "--data=datamodules.SimCLRDataModule",
        f"--data.train_shards={shards}",
        "--data.val_shards=null",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=0",
        "--data.attack.rate=0.1",
        "--data.attack.reference_pool_size=8",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=5",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert int(state["queue_ptr"]) == 5 * 16  # 5 steps of the global batch, not of one rank's 8
    filled = state["queue"][: 5 * 16]
    torch.testing.assert_close(filled.norm(dim=1), torch.ones(5 * 16))
    assert len({tuple(row.tolist()) for row in filled}) == 5 * 16  # every rank's keys, none written twice
