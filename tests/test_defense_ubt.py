"""UBT end to end on CPU: a tiny poisoned CLIP run, then detection (scored against the manifest) and unlearning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.cli import main
from poisoning.plan import records_from_manifest
from tests.test_defense_mcldef import (
    CLIP_DATA,
    CLIP_MODEL,
    clip_badnet,
    data_args,
    pretrain,
    quick_trainer,
    sha256,
    write_shards,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ubt")
    train = write_shards(root / "shards", "train", 80, captions=True)  # 2 shards: equal halves on 2 ranks
    val = write_shards(root / "shards", "val", 40, captions=True)
    return {"train": train, "val": val, "checkpoint": pretrain(root / "poisoned", "clip", train, val)}


def run_ubt(run: Path, setup: dict[str, Path], extra: list[str] = ()) -> int:
    return main(
        [
            "fit",
            "--config=configs/defense/ubt.yaml",
            f"--model.init_args.checkpoint={setup['checkpoint']}",
            *CLIP_MODEL,
            "--model.init_args.overfit_steps=2",
            "--model.init_args.flag_count=24",
            "--model.init_args.unlearn_count=8",
            "--model.init_args.forget_batch_size=4",
            *clip_badnet(),
            *CLIP_DATA,
            *data_args(setup["train"], setup["val"], fraction=1.0),
            *quick_trainer(run, steps=3),
            *extra,
        ]
    )


def test_ubt_end_to_end(tmp_path, setup):
    source = setup["checkpoint"]
    digest = sha256(source)
    run = tmp_path / "ubt"
    assert run_ubt(run, setup) == 0

    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["defense"] == "ubt"
    for stage in ("before", "after"):
        assert report[stage]["n_images"] == 40 and report[stage]["asr_images"] == 30

    # Detection, scored against the manifest the data module wrote for this run.
    poisons = {r["key"] for r in records_from_manifest(run / "poison_manifest.jsonl")}
    detection = json.loads((run / "ubt_detection.json").read_text())
    assert detection["truth_source"].startswith("manifest") and detection["stream_flags_agree_with_truth"]
    assert detection["scored"] == 80 and detection["true_poisons"] == len(poisons) == detection["manifest_poisons"]
    assert detection["flagged"] == 24 == len(detection["flagged_pairs"])
    flagged_poisons = sum(pair["poisoned"] for pair in detection["flagged_pairs"])
    assert (
        detection["true_positives"] == flagged_poisons == len({p["key"] for p in detection["flagged_pairs"]} & poisons)
    )
    assert detection["true_positives"] + detection["false_positives"] == 24
    assert detection["true_positives"] + detection["false_negatives"] == len(poisons)
    assert detection["precision"] == pytest.approx(flagged_poisons / 24)
    assert detection["recall"] == pytest.approx(flagged_poisons / len(poisons))
    assert 0 <= detection["precision"] <= 1 and 0 <= detection["recall"] <= 1
    assert 0 <= detection["auroc"] <= 1 and 0 <= detection["auroc_poisoned_model_similarity"] <= 1
    scores = [pair["score"] for pair in detection["flagged_pairs"]]
    assert scores == sorted(scores, reverse=True)
    assert detection["selected"] == 8 == sum(pair["unlearnt"] for pair in detection["flagged_pairs"][:8])
    extra = report["extra"]["detection"]
    assert {k: extra[k] for k in ("precision", "recall", "flagged", "true_poisons")} == {
        k: detection[k] for k in ("precision", "recall", "flagged", "true_poisons")
    }

    # Only the token portion moved: vision class token / positional embedding, and the chosen token-table rows.
    before = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 3
    weights = after["state_dict"]
    assert set(weights) == set(before)
    portion = {"model.visual.class_embedding", "model.visual.positional_embedding"}
    for name in portion:
        assert not torch.equal(before[name], weights[name]), name
    table = "model.token_embedding.weight"
    rows = torch.tensor(detection["text_rows"], dtype=torch.long)
    frozen_rows = torch.ones(before[table].shape[0], dtype=torch.bool)
    frozen_rows[rows] = False
    assert torch.equal(before[table][frozen_rows], weights[table][frozen_rows])
    if rows.numel():
        assert not torch.equal(before[table][rows], weights[table][rows])
    for name in set(before) - portion - {table}:
        assert torch.equal(before[name], weights[name]), name
    updated = report["extra"]["updated"]
    assert updated["updated_weights"] < updated["model_weights"] / 10
    assert sha256(source) == digest


def test_ubt_resumes_without_redoing_the_detection(tmp_path, setup):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    every = ["--checkpoint.every_n_train_steps=1"]
    assert run_ubt(straight, setup, every) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=2"]
    with pytest.raises(RuntimeError, match="killed after step 2"):
        run_ubt(interrupted, setup, [*every, *interrupt])
    (interrupted / "ubt_detection.json").unlink()  # stage 1 must not run again (it would write it)
    assert run_ubt(interrupted, setup, [*every, "--ckpt_path", "last"]) == 0
    assert not (interrupted / "ubt_detection.json").exists()
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["clbd_ubt"]["flagged"] == b["clbd_ubt"]["flagged"]


# ---- bad input: one clear line, exit 2 --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.init_args.weight_decay=0.1", "model.weight_decay=0.1: UBT needs 0"),
        ("--data.init_args.poison_train=false", "data.poison_train: UBT detects and unlearns poisoned pairs"),
        ("--model.init_args.token_portion=everything", "model.token_portion must be one of"),
    ],
)
def test_bad_settings_are_refused(tmp_path, setup, capsys, override, message):
    assert run_ubt(tmp_path / "run", setup, [override]) == 2
    assert message in capsys.readouterr().err


def test_simclr_checkpoint_is_refused(tmp_path, setup, capsys):
    simclr = tmp_path / "simclr"
    train = write_shards(tmp_path / "shards", "train", 48)
    checkpoint = pretrain(simclr, "simclr", train, train)
    assert run_ubt(tmp_path / "run", setup, [f"--model.init_args.checkpoint={checkpoint}"]) == 2
    assert "holds a SimCLR model; this defense repairs CLIP models" in capsys.readouterr().err


@pytest.mark.slow
def test_ubt_on_two_ranks_scores_every_pair_once(tmp_path, setup):
    """DDP (gloo, 2 CPU ranks): each rank scores its half of the stream; the merged detection covers all pairs."""
    run = tmp_path / "ddp"
    args = [
        "fit",
        "--config=configs/defense/ubt.yaml",
        f"--model.init_args.checkpoint={setup['checkpoint']}",
        *CLIP_MODEL,
        "--model.init_args.overfit_steps=2",
        "--model.init_args.flag_count=24",
        "--model.init_args.unlearn_count=8",
        "--model.init_args.forget_batch_size=4",
        *clip_badnet(),
        *CLIP_DATA,
        *data_args(setup["train"], setup["val"], fraction=1.0),
        *quick_trainer(run, steps=2),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    # Lightning starts the second rank by re-running the command line: run the CLI, not pytest, in a subprocess.
    done = subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    detection = json.loads((run / "ubt_detection.json").read_text())
    poisons = {r["key"] for r in records_from_manifest(run / "poison_manifest.jsonl")}
    assert detection["scored"] == 80 and detection["true_poisons"] == len(poisons)
    assert detection["stream_flags_agree_with_truth"] and detection["flagged"] == 24
    assert detection["true_positives"] + detection["false_negatives"] == len(poisons)
    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["before"]["n_images"] == report["after"]["n_images"] == 40  # summed over the two ranks
