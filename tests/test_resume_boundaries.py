"""Exact resume at epoch boundaries: a poisoned run stopped at each kind of boundary and resumed from the checkpoint it
left (Lightning's epoch-end checkpoint before or after validation, a checkpoint at an epoch's last step, SLURM's
``hpc_ckpt`` during validation or at the epoch's end, the final one) ends with the weights, the per-step samples and
poisoned counts, and the data report of an uninterrupted run. Mid-epoch stops: tests/test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clbd import main
from datamodules.shards import ShardSink
from tests.callbacks import SimulatedPreemption
from tests.conftest import png_bytes, solid_class_image
from tests.test_resume import CLIP, SIMCLR

# 160 samples in 4 shards, batch 16: SimCLR takes 9 steps an epoch (NA's reference pool leaves the stream), CLIP 10.
STEPS_PER_EPOCH = {"simclr": 9, "clip": 10}
METHODS = {"simclr": SIMCLR, "clip": CLIP}

# name: (extra trainer/checkpoint settings, StopAt hook, its epoch, hpc file it saves first, --ckpt_path)
BOUNDARIES = {
    # after epoch 1's last step (and its validation), before its checkpoint: resumes from epoch 0's end
    "before_epoch_checkpoint": ([], "on_train_epoch_end", 1, None, "last"),
    # just after the epoch-end checkpoint (ModelCheckpoint's default: on_train_epoch_end, after validation)
    "after_epoch_checkpoint": ([], "on_train_batch_start", 1, None, "last"),
    # the epoch-end checkpoint written when validation ends, stopped before the epoch's end hooks
    "after_validation_checkpoint": (
        ["--checkpoint.save_on_train_epoch_end=false"],
        "on_train_epoch_end",
        0,
        None,
        "last",
    ),
    # a checkpoint at the epoch's last step (every_n_train_steps), stopped before validation
    "last_step_checkpoint": (["--checkpoint.every_n_train_steps={steps}"], "on_validation_start", 0, None, "last"),
    # SLURM's requeue signal during validation, and during on_train_epoch_end before the bookkeeping callback's turn
    "hpc_during_validation": ([], "on_validation_batch_end", 0, "hpc_ckpt_1.ckpt", "hpc"),
    "hpc_at_epoch_end": ([], "on_train_epoch_end", 0, "hpc_ckpt_1.ckpt", "hpc"),
    # killed after the last checkpoint of training, before the run was marked finished
    "end_of_training": ([], "on_train_end", 2, None, "last"),
}
CASES = [("simclr", name) for name in BOUNDARIES] + [
    ("clip", name) for name in ("after_epoch_checkpoint", "last_step_checkpoint", "hpc_at_epoch_end")
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("boundary-shards")
    names = [f"class{c}" for c in range(4)]
    with ShardSink(out, "train", maxcount=40, classes=names) as sink:
        for i in range(160):
            caption = f"a photo of a {names[i % 4]} number {i}"
            sink.write(
                f"train{i:05d}", {"png": png_bytes(solid_class_image(i % 4, i, 32)), "cls": i % 4, "txt": caption}
            )
    return out


def fit_args(method: str, shards: Path, run: Path, *extra: str) -> list[str]:
    model, data, attack = METHODS[method]
    return [
        *model,
        *data,
        *attack,
        f"--data.train_shards={shards}/train.index.json",
        f"--data.val_shards={shards}/train.index.json",
        "--data.max_val_samples=32",
        "--data.eval_batch_size=16",
        "--data.num_workers=2",
        "--data.shuffle_buffer=40",
        "--trainer.max_epochs=2",
        "--trainer.deterministic=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.callbacks+=tests.callbacks.RecordKeys",
        f"--trainer.callbacks.folder={run / 'keys'}",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]


_straight: dict[str, Path] = {}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """The uninterrupted run of a method (made once per module)."""

    def run(method: str) -> Path:
        if method not in _straight:
            folder = tmp_path_factory.mktemp(f"straight-{method}")
            assert main(["fit", *fit_args(method, shards, folder)]) == 0
            _straight[method] = folder
        return _straight[method]

    return run


def steps(run: Path) -> dict[int, dict]:
    """Each step's record (epoch, keys, poisoned count); a step run again after the resume replaces the first."""
    lines = (run / "keys" / "rank0.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


@pytest.mark.parametrize(("method", "boundary"), CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_resume_at_an_epoch_boundary_is_bitwise_exact(tmp_path, shards, straight, method, boundary):
    settings, hook, epoch, save, ckpt_path = BOUNDARIES[boundary]
    settings = [s.format(steps=STEPS_PER_EPOCH[method]) for s in settings]
    reference, run = straight(method), tmp_path / "run"
    stop = ["--trainer.callbacks+=tests.callbacks.StopAt", f"--trainer.callbacks.hook={hook}"]
    stop += [f"--trainer.callbacks.epoch={epoch}", *([f"--trainer.callbacks.save={save}"] if save else [])]
    with pytest.raises(SimulatedPreemption):
        main(["fit", *fit_args(method, shards, run, *settings, *stop)])
    assert not (run / "fit_finished.json").exists()
    if save:
        assert (run / save).exists()
    assert main(["fit", *fit_args(method, shards, run, *settings), f"--ckpt_path={ckpt_path}"]) == 0

    a = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH[method]
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    expected, got = steps(reference), steps(run)
    assert sorted(got) == sorted(expected)
    for step, record in expected.items():
        assert got[step] == record, f"step {step}"  # the same samples, so the same poisoned ones, in each step
    assert sum(r["poisoned"] for r in expected.values()) > 0
    report = json.loads((run / "data_report.json").read_text())
    assert report == json.loads((reference / "data_report.json").read_text())  # each epoch counted once
    assert [e["epoch"] for e in report["per_epoch"]] == [0, 1]
