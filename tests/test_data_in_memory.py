"""Data held in memory: evaluation batches made once and replayed (data.cache_eval_batches), shard sets decoded once
(data.resident, only for the streams a run reads more than once), and a fit that validates every epoch logs the same
monitors and ends on the same weights with both as without. (Resident streams give the tars' batches bit for bit:
tests/test_poison_stream.py; their fault counts: tests/test_fault_counts.py.)"""

from __future__ import annotations

import csv
from collections import Counter

import torch

from clbd import main
from datamodules.modalities import SimCLRDataModule
from datamodules.replay import ReplayLoader
from datamodules.stream import ShardStream
from tests.test_resume import SIMCLR


class CountingLoader:
    """Five numbered batches; counts how many it produced over all passes."""

    def __init__(self) -> None:
        self.produced = 0

    def __len__(self) -> int:
        return 5

    def __iter__(self):
        for number in range(5):
            self.produced += 1
            yield {"number": number}


def test_replay_reads_the_loader_once_and_continues_a_pass_stopped_early():
    loader = CountingLoader()
    replay = ReplayLoader(loader)
    sanity = []
    for batch in replay:  # Lightning's sanity check: two batches, then the pass is abandoned
        sanity.append(batch["number"])
        if len(sanity) == 2:
            break
    assert sanity == [0, 1] and not replay.complete
    assert [b["number"] for b in replay] == [0, 1, 2, 3, 4] and replay.complete
    produced = loader.produced  # the first 2 again (skipped), then 3 more
    assert [b["number"] for b in replay] == [0, 1, 2, 3, 4]
    assert [b["number"] for b in replay] == [0, 1, 2, 3, 4]
    assert loader.produced == produced and len(replay) == 5


def test_resident_sets_are_built_for_the_streams_read_every_epoch_only(make_shards):
    train = make_shards(n=64, per_shard=32)
    test = make_shards(n=32, per_shard=32, prefix="test")
    common = dict(train_shards=str(train), val_shards=str(test), batch_size=16, num_workers=0, resident=True)
    testing = SimCLRDataModule(**common)  # clbd test: the bank and the test images are read once
    testing.setup("test")
    assert all(loader.dataset.resident is None for loader in testing.test_dataloader())
    fitting = SimCLRDataModule(**common)
    fitting.setup("fit")
    assert fitting.train_dataloader().dataset.resident is not None
    bank, val = fitting.val_dataloader()
    assert bank.dataset.resident is fitting.train_dataloader().dataset.resident  # one copy of the training set
    assert val.dataset.resident is not None
    # once in memory (the same shards, e.g. fit then test in one process), a one-pass stream uses it too
    assert all(loader.dataset.resident is not None for loader in fitting.test_dataloader())


def validation_metrics(run) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/knn_acc")]
    return [{k: v for k, v in row.items() if k.startswith("val/") and v} for row in rows]


def test_a_fit_with_cached_eval_batches_and_resident_shards_logs_the_same_monitors(tmp_path, make_shards, monkeypatch):
    made = Counter()  # evaluation batches the streams made (no loader processes: counted in this process)
    original = ShardStream._batch

    def counted(self, items, worker):
        if self.name in ("val", "knn_bank"):
            made[self.name] += 1
        return original(self, items, worker)

    monkeypatch.setattr(ShardStream, "_batch", counted)
    train = make_shards(n=160, per_shard=40)
    val = make_shards(n=64, per_shard=32, prefix="val")
    model, data, attack = SIMCLR

    def fit(run, *extra):
        made.clear()
        args = [
            *model,
            *data,
            *attack,
            f"--data.train_shards={train}/train.index.json",
            f"--data.val_shards={val}/val.index.json",
            "--data.num_workers=0",
            "--data.knn_bank_size=96",
            "--data.eval_batch_size=32",
            "--trainer.max_epochs=3",
            "--trainer.limit_train_batches=3",
            "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={run}",
            *extra,
        ]
        assert main(["fit", *args]) == 0
        return validation_metrics(run), dict(made)

    plain, plain_made = fit(tmp_path / "plain")
    cached, cached_made = fit(tmp_path / "cached", "--data.resident=true", "--data.cache_eval_batches=true")
    assert len(plain) == 3 and "val/knn_attributable_asr" in plain[0]
    assert cached == plain
    # Without the cache: the sanity check's 2 batches of each, then 3 validations of 3 bank + 2 val batches. With it:
    # the sanity check's, the first validation re-makes the 2 bank batches it skips and makes the 3rd; then none.
    assert plain_made == {"knn_bank": 2 + 3 * 3, "val": 2 + 3 * 2}
    assert cached_made == {"knn_bank": 2 + 3, "val": 2}
    a = torch.load(tmp_path / "plain/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cached/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
