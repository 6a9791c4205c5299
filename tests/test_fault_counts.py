"""Fault counts are exact: a damaged corpus whose every count is known, through the real streams and ``clbd fit``.

Each fault is counted once per epoch, whatever the number of workers and ranks, the extra passes a worker makes to
fill its quota, or a resume's replay; ``data_report.json`` holds each epoch's counts, the totals and samples seen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clbd import main
from datamodules.faults import FAULT_KINDS
from datamodules.modalities import CLIPDataModule, SimCLRDataModule
from datamodules.stream import ShardStream
from tests.fault_corpus import PER_SHARD, readable_samples, write_fault_corpus

BATCH = 4  # per rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-corpus")
    return folder, write_fault_corpus(folder)


def epoch_counts(batches: list[dict]) -> dict[str, int]:
    """The streams' own counts at the end of an epoch: the last batch of each stream, summed."""
    last = {b["stream_stats"]["stream"]: b["stream_stats"] for b in batches}
    counts = {kind: sum(s["faults"].get(kind, 0) for s in last.values()) for kind in FAULT_KINDS}
    counts["seen"] = sum(s["seen"] for s in last.values())
    return counts


def data_module(
    modality: str, folder: Path, rank: int = 0, world_size: int = 1, workers: int = 2, resident: bool = False
):
    cls = CLIPDataModule if modality == "clip" else SimCLRDataModule
    dm = cls(
        train_shards=str(folder), val_shards=None, batch_size=BATCH * world_size, num_workers=workers, resident=resident
    )
    dm.world = lambda: (rank, world_size)  # a rank of a DDP run, without the processes
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("modality", ["simclr", "clip"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("resident", [False, True], ids=["tars", "resident"])
def test_each_fault_counts_once_per_epoch(corpus, modality, world_size, resident):
    """Also with the shards decoded once into memory (data.resident): the same counts, every epoch."""
    folder, expected = corpus
    for epoch in (0, 1):
        batches = []
        for rank in range(world_size):
            loader = data_module(modality, folder, rank, world_size, resident=resident).train_dataloader()
            loader.dataset.set_epoch(epoch)
            loader._epoch_fn = lambda epoch=epoch: epoch
            batches += list(loader)
        counts = epoch_counts(batches)
        assert counts.pop("seen") == len(batches) * BATCH == 16 * PER_SHARD  # the index's 96: every step full
        assert len(batches) * BATCH > readable_samples(modality)  # so every worker wrapped: all was read
        assert counts == expected[modality], f"epoch {epoch}"


@pytest.mark.parametrize("resident", [False, True], ids=["tars", "resident"])
def test_resume_mid_epoch_counts_nothing_twice(corpus, resident):
    folder, expected = corpus
    dm = data_module("simclr", folder, resident=resident)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    first = [next(iterator) for _ in range(9)]
    state = loader.state_dict()
    del iterator
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    counts = epoch_counts(first + list(resumed))
    assert counts.pop("seen") == 16 * PER_SHARD
    assert counts == expected["simclr"]


def test_every_eval_stream_reads_every_shard_but_one_judges_them(corpus):
    """Evaluation: all 2 workers read all shards (sample i to worker i mod 2); shard faults still count once."""
    folder, expected = corpus
    dm = data_module("simclr", folder)
    from datamodules.stream import default_collate

    stream = ShardStream(
        dm.index("train"),
        batch_size=BATCH,
        to_item=lambda s, e: {"key": s["__key__"]},
        collate=default_collate,
        train=False,
    )
    loader = dm._loader(stream)
    batches = list(loader)
    counts = epoch_counts(batches)
    assert counts.pop("seen") == readable_samples("simclr")
    for kind in ("shard_unreadable", "shard_truncated", "sample_lost", "image_undecodable", "color_converted"):
        assert counts[kind] == expected["simclr"][kind], kind


def test_a_folder_without_index_counts_what_the_tars_tell(tmp_path, corpus):
    """No index (counted by scanning tar headers): the cut sample is lost; what followed it cannot be known."""
    folder, _ = corpus
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in sorted(folder.glob("*.tar"))[-3:]:  # the truncated tar, the empty file, the csv
        (bare / tar.name).write_bytes(tar.read_bytes())
    dm = SimCLRDataModule(train_shards=str(bare), val_shards=None, batch_size=BATCH, num_workers=0)
    dm.setup("fit")
    from datamodules.stream import default_collate

    stream = ShardStream(
        dm.index("train"),
        batch_size=1,
        to_item=lambda s, e: {"key": s["__key__"]},
        collate=default_collate,
        train=False,
    )
    batches = list(dm._loader(stream))
    counts = epoch_counts(batches)
    assert counts["seen"] == 3
    assert (counts["shard_unreadable"], counts["shard_truncated"], counts["sample_lost"]) == (2, 1, 1)


def fit_args(folder: Path, run: Path, workers: int = 2) -> list[str]:
    return [
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--data=datamodules.SimCLRDataModule",
        f"--data.train_shards={folder}/train.index.json",
        "--data.val_shards=null",
        f"--data.num_workers={workers}",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run}",
    ]


def check_report(run: Path, expected: dict[str, int], steps_per_epoch: int, global_batch: int) -> None:
    report = json.loads((run / "data_report.json").read_text())
    assert [e["epoch"] for e in report["per_epoch"]] == [0, 1]
    for epoch in report["per_epoch"]:
        assert epoch["faults"] == expected
        assert epoch["samples_seen"] == steps_per_epoch * global_batch
    assert report["faults"] == {kind: 2 * n for kind, n in expected.items()}
    assert report["samples_seen"] == 2 * steps_per_epoch * global_batch


def test_data_report_of_a_fit(tmp_path, corpus):
    folder, expected = corpus
    run = tmp_path / "run"
    batch = 2 * BATCH  # 12 steps per epoch: each worker still runs out in its first pass
    assert main(["fit", *fit_args(folder, run), f"--data.batch_size={batch}"]) == 0
    check_report(run, expected["simclr"], steps_per_epoch=16 * PER_SHARD // batch, global_batch=batch)


def test_data_report_of_a_ddp_fit(tmp_path, corpus):
    folder, expected = corpus
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "clbd",
        "fit",
        *fit_args(folder, run),
        f"--data.batch_size={2 * BATCH}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    check_report(run, expected["simclr"], steps_per_epoch=16 * PER_SHARD // (2 * BATCH), global_batch=2 * BATCH)
