"""The clbd command: help, tool routing, evaluation results files, and configuration errors before compute."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest

from clbd import main
from datamodules.shards import ShardSink
from tests.conftest import png_bytes, solid_class_image


def test_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "clbd", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("fit", "validate", "test", "data", "poison", "demo", "experiment"):
        assert f"  {command} " in done.stdout


def test_data_tools_are_routed(make_shards, capsys):
    folder = make_shards(n=30, per_shard=10)
    assert main(["data", "info", str(folder)]) == 0
    assert "30" in capsys.readouterr().out


def simclr_args(shards, run, *extra):
    return [
        "--model=lightning_modules.SimCLR",
        "--model.width=8",
        "--model.proj_hidden_dim=32",
        "--model.probe_epochs=5",
        "--data=datamodules.SimCLRDataModule",
        f"--data.train_shards={shards}",
        f"--data.val_shards={shards}",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]


def clip_args(shards, run, *extra):
    return [
        "--model=lightning_modules.CLIP",
        "--model.model_name=clip-tiny-vit",
        "--model.zero_shot_templates=photo",
        "--data=datamodules.CLIPDataModule",
        "--data.model_name=clip-tiny-vit",
        f"--data.train_shards={shards}",
        f"--data.val_shards={shards}",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        *extra,
    ]


def test_metrics_json_for_simclr_and_clip(tmp_path, make_shards):
    shards = make_shards(n=64, per_shard=16, captions=True)
    na = [
        "--data.attack=poisoning.NoisyAlignment",
        "--data.attack.target_class=1",
        "--data.attack.rate=0.2",
        "--data.attack.reference_pool_size=4",
    ]
    badnet = ["--data.attack=poisoning.BadNet", "--data.attack.target_class=class1", "--data.attack.rate=0.2"]
    for name, args, attack in (("simclr", simclr_args, na), ("clip", clip_args, badnet)):
        run = tmp_path / name
        assert main(["fit", *args(shards, run, *attack)]) == 0
        ckpt = run / "checkpoints" / "last.ckpt"
        assert main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}"]) == 0
        results = json.loads((ckpt.parent / "metrics.json").read_text())["last.ckpt"]
        assert results["attack"]["target"] == 1 and results["attack"]["target_name"] == "class1"
        assert "true class is not the target" in results["asr_definition"]
        if name == "simclr":
            for evaluation in ("knn", "linear_probe"):
                assert 0 <= results[evaluation]["accuracy"] <= 1 and results[evaluation]["n_images"] == 64
                assert results[evaluation]["asr_images"] == 48  # the 16 target-class images are not counted
        else:
            assert 0 <= results["clean_accuracy_top1"] <= results["clean_accuracy_top5"] <= 1
            assert results["n_images"] == 64 and results["asr_images"] == 48
            assert 0 <= results["asr_top1"] <= results["asr_top10"] <= 1
        # Every evaluator reports the same backdoor block: control trigger, attributable ASR, clean->target, ...
        blocks = (
            [results["knn"]["backdoor"], results["linear_probe"]["backdoor"]]
            if name == "simclr"
            else [results["backdoor"]]
        )
        for backdoor in blocks:
            for key in ("asr", "control_asr", "clean_to_target", "flip_rate"):
                assert backdoor[key]["images"] == 48 and 0 <= backdoor[key]["value"] <= 1
            assert backdoor["target_accuracy"]["images"] == 16
            assert backdoor["attributable_asr"]["value"] == backdoor["asr"]["value"] - backdoor["control_asr"]["value"]
            assert [sum(backdoor["histograms"][h]) for h in ("clean", "triggered", "control")] == [64, 64, 64]
            assert sum(backdoor["histograms"]["clean_target_class"]) == 16
            assert "attributable_asr" in backdoor["definitions"]
        probe_asr = results["linear_probe"]["asr"] if name == "simclr" else results["asr_top1"]
        assert blocks[-1]["asr"]["value"] == probe_asr  # one definition of ASR
        # Evaluation logs go beside the training log, never over it.
        assert (run / "metrics.csv").exists() and (run / "test" / "metrics.csv").exists()


def write_unlabelled_names(folder):
    with ShardSink(folder, "val", maxcount=16) as sink:  # labels but no class names in the index
        for i in range(32):
            sink.write(f"v{i}", {"png": png_bytes(solid_class_image(i % 2, i)), "cls": i % 2})
    return folder


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.backbone=resnet7"], "resnet7"),
        (["--data.batch_size=0"], "batch_size"),
        (["--ckpt_path=/nowhere/last.ckpt"], "/nowhere/last.ckpt"),
    ],
)
def test_configuration_errors_stop_before_compute(tmp_path, make_shards, capsys, extra, message):
    shards = make_shards(n=32, per_shard=16)
    run = tmp_path / "run"
    assert main(["fit", *simclr_args(shards, run, *extra)]) == 2
    assert message in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_unknown_clip_model_and_eval_set_without_class_names(tmp_path, make_shards, capsys):
    shards = make_shards(n=32, per_shard=16, captions=True)
    assert main(["fit", *clip_args(shards, tmp_path / "a", "--model.model_name=ViT-Q-99")]) == 2
    assert "ViT-Q-99" in capsys.readouterr().err
    unnamed = write_unlabelled_names(tmp_path / "unnamed")  # (an eval set falls back on the train set's names)
    run = tmp_path / "b"
    assert main(["fit", *simclr_args(unnamed, run)]) == 2
    assert "no class names" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()


def test_no_misleading_lightning_warning_on_a_first_start_or_an_evaluation(tmp_path, make_shards, caplog):
    """``--ckpt_path last`` on a new run (how experiment steps and requeued jobs start) drew Lightning's hint to set
    save_last=True, which clbd does; every evaluation of a checkpoint drew a warning that its folder differs from the
    training run's. Neither says anything true here."""
    shards = make_shards(n=32, per_shard=16)
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="clbd"):
        warnings.simplefilter("always")
        assert main(["fit", *simclr_args(shards, run), "--ckpt_path=last"]) == 0
        ckpt = run / "checkpoints" / "last.ckpt"
        assert main(["test", "--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}"]) == 0
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "no last checkpoint available" in m or "dirpath has changed" in m], messages
    assert f"no checkpoint in {run / 'checkpoints'} yet; a new run starts" in caplog.text
    assert (ckpt.parent / "metrics.json").exists()


def test_test_set_with_other_classes_than_the_val_set(tmp_path, make_shards, capsys):
    shards = make_shards(n=32, per_shard=16)
    other = make_shards(n=32, per_shard=16, classes=2, prefix="test")
    run = tmp_path / "run"
    assert main(["fit", *simclr_args(shards, run)]) == 0
    argv = simclr_args(shards, run, f"--data.test_shards={other}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert main(["test", *argv]) == 2
    err = capsys.readouterr().err
    assert "data.test_shards" in err and "class0" in err
    assert not (run / "checkpoints" / "metrics.json").exists()
