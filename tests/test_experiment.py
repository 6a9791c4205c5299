"""clbd experiment end to end on tiny models: seeds with intervals, equal defense budgets, the image-SSL grid, reuse
of finished runs, and errors that name the field before any compute."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from clbd.experiment import METRICS, interval
from clbd.experiment import main as experiment_main
from clbd.experiment.arms import expand
from clbd.experiment.plan import check_before_compute, load_plan
from clbd.experiment.runs import run_arm
from lightning_modules import CLIP


def write_attack(path, class_path: str, **init_args) -> str:
    path.write_text(
        yaml.safe_dump({"data": {"init_args": {"attack": {"class_path": class_path, "init_args": init_args}}}})
    )
    return str(path)


def clip_overrides(shards) -> list[str]:
    return [
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.model_name=clip-tiny-vit",
        "--model.init_args.zero_shot_templates=photo",
        "--data.init_args.model_name=clip-tiny-vit",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        f"--data.init_args.test_shards={shards}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=32",
        "--data.init_args.eval_batch_size=64",
        "--trainer.max_epochs=1",
    ]


def run_experiment(tmp_path, plan: dict):
    """Write ``plan`` as an experiment file, run it into ``tmp_path/out`` (it must succeed), return that folder."""
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 0
    return out


def clip_plan(shards, attack: str, defenses: dict, **more) -> dict:
    """Two seeds of a tiny CLIP attack x defense plan with a clean reference and a tiny defense budget."""
    return {
        "seeds": [0, 1],
        "common": clip_overrides(shards),
        "pretrain": {"configs": ["configs/smoke/clip_shapes.yaml", attack], "overrides": []},
        "clean_reference": True,
        "defenses": defenses,
        **more,
    }


def test_defense_experiment_over_seeds_with_equal_budgets(tmp_path, make_shards):
    shards = make_shards(n=96, per_shard=32, captions=True)
    attack = write_attack(tmp_path / "attack.yaml", "poisoning.BadNet", target_class="class1", rate=0.3, trigger_size=6)
    defenses = {"cleanclip": {"configs": ["configs/defense/cleanclip.yaml"]}}
    plan = clip_plan(shards, attack, defenses, defense_budget={"steps": 2, "batch_size": 16})
    out = run_experiment(tmp_path, plan)

    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["clean reference", "poisoned (no defense)", "cleanclip"]
    for row in table["rows"]:
        assert set(row["per_seed"]) == {"0", "1"}
        for name in ("ca", "asr", "control_asr", "attributable_asr", "clean_to_target", "flip_rate"):
            stat = row["summary"][name]
            assert stat["n"] == 2 and stat["low"] <= stat["mean"] <= stat["high"]
            seeds = [row["per_seed"][s][name] for s in ("0", "1")]
            assert stat["mean"] == pytest.approx(sum(seeds) / 2)
        for values in row["per_seed"].values():
            assert values["attributable_asr"] == pytest.approx(values["asr"] - values["control_asr"])
            assert values["asr_images"] == 72  # the 96 images less the 24 of the target class
    defended = table["rows"][2]
    assert defended["steps"] == [2] and defended["samples"] == [32]  # the budget, as run, for every seed
    for seed in (0, 1):  # each seed has its own runs; CPU steps ran in 32-bit
        saved = yaml.safe_load((out / f"seed{seed}" / "cleanclip" / "config.yaml").read_text())
        assert saved["seed_everything"] == seed and saved["trainer"]["precision"] == "32-true"
        assert not (out / f"seed{seed}" / "clean" / "poison_manifest.jsonl").exists()
    text = (out / "table.md").read_text()
    assert (
        "| cleanclip |" in text and "**attributable ASR**" in text and " ± " in text and "2 steps, 32 samples" in text
    )
    assert Image.open(out / "table.png").size[0] > 300
    # A second call reuses every finished run and only rewrites the table, keeping the measured minutes.
    marker = out / "seed1" / "poisoned" / "fit_finished.json"
    before = marker.stat().st_mtime_ns
    assert experiment_main(["--config", str(tmp_path / "experiment.yaml"), "--out", str(out)]) == 0
    again = json.loads((out / "table.json").read_text())
    assert [r["minutes"] for r in again["rows"]] == [r["minutes"] for r in table["rows"]]
    assert marker.stat().st_mtime_ns == before
    # An edited defense is refused before compute, never answered with the run made by the old one.
    plan["defenses"]["cleanclip"]["overrides"] = ["--model.init_args.lr=1.0e-3"]
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(plan))
    assert experiment_main(["--config", str(tmp_path / "edited.yaml"), "--out", str(out)]) == 2
    assert json.loads((out / "table.json").read_text()) == again
    # So is an edited config file under the same arguments (another poisoning rate makes another model).
    Path(attack).write_text(Path(attack).read_text().replace("rate: 0.3", "rate: 0.2"))
    assert experiment_main(["--config", str(tmp_path / "experiment.yaml"), "--out", str(out)]) == 2
    assert json.loads((out / "table.json").read_text()) == again


def test_base_model_is_trained_once_and_every_seed_fine_tunes_it(tmp_path, make_shards):
    shards = make_shards(n=64, per_shard=32, captions=True)
    attack = write_attack(tmp_path / "attack.yaml", "poisoning.BadNet", target_class="class1", rate=0.3, trigger_size=6)
    defenses = {"finetune": {"configs": ["configs/defense/cleanclip.yaml"]}}
    base_section = {"configs": ["configs/smoke/clip_shapes.yaml"], "seed": 5}
    plan = clip_plan(shards, attack, defenses, base=base_section, defense_budget={"steps": 1, "batch_size": 16})
    out = run_experiment(tmp_path, plan)

    base = out / "base" / "checkpoints" / "last.ckpt"
    assert yaml.safe_load((out / "base" / "config.yaml").read_text())["seed_everything"] == 5
    assert not (out / "seed0" / "base").exists()  # one clean model for all seeds
    for seed in (0, 1):
        for run in ("poisoned", "clean"):
            saved = yaml.safe_load((out / f"seed{seed}" / run / "config.yaml").read_text())
            assert saved["model"]["init_args"]["pretrained"] == str(base)
            assert saved["seed_everything"] == seed
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["clean reference", "poisoned (no defense)", "finetune"]
    assert json.loads((out / "base" / "provenance.json").read_text())["wall_s"]["fit"] > 0

    # The finished base is reused only by the command that made it: another base seed is refused before compute.
    plan["base"]["seed"] = 6
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(plan))
    arms = {arm.id: arm for arm in expand(load_plan(tmp_path / "other.yaml"), out)}
    with pytest.raises(ValueError, match=r"base was made by another command .*--seed_everything=6"):
        run_arm(arms["base"], arms, out)


def test_clip_fine_tunes_a_clbd_checkpoint(tmp_path, make_shards):
    import torch

    from lightning_modules.safe_checkpoint import load_checkpoint

    shards = make_shards(n=32, per_shard=32, captions=True)
    plan = {
        "seeds": [0],
        "common": clip_overrides(shards),
        "base": {"configs": ["configs/smoke/clip_shapes.yaml"]},
        "pretrain": {
            "configs": [
                "configs/smoke/clip_shapes.yaml",
                write_attack(tmp_path / "a.yaml", "poisoning.BadNet", target_class="class1", rate=0.3),
            ]
        },
        "defenses": {},
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(plan))
    arms = {arm.id: arm for arm in expand(load_plan(tmp_path / "e.yaml"), tmp_path / "out")}
    run_arm(arms["base"], arms, tmp_path / "out")
    checkpoint = arms["base"].model_checkpoint()
    model = CLIP(model_name="clip-tiny-vit", pretrained=checkpoint)
    saved = load_checkpoint(checkpoint)["state_dict"]
    for name, value in model.model.state_dict().items():
        assert torch.equal(value, saved[f"model.{name}"]), name
    with pytest.raises(ValueError, match="model.pretrained: .* does not fit clip-tiny-rn"):
        CLIP(model_name="clip-tiny-rn", pretrained=checkpoint)


def test_image_ssl_experiment_runs_attack_by_method_with_a_clean_reference(tmp_path, make_shards):
    shards = make_shards(n=64, per_shard=32)
    attack = write_attack(tmp_path / "sslbkd.yaml", "poisoning.SSLBKD", target_class=0, rate=0.5, trigger_size=6)
    method = [
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.width=8",
        "--model.init_args.proj_hidden_dim=32",
        "--model.init_args.knn_k=5",
        "--model.init_args.probe_epochs=3",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        f"--data.init_args.test_shards={shards}",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--data.init_args.knn_bank_size=64",
    ]
    plan = {
        "seeds": [3],
        "methods": {"simclr": {"configs": ["configs/smoke/simclr_shapes.yaml"], "overrides": method}},
        "attacks": {"sslbkd": {"configs": [attack]}},
    }
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 0
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["simclr clean, sslbkd trigger", "simclr + sslbkd"]
    for row in table["rows"]:
        values = row["per_seed"]["3"]
        assert 0 <= values["ca"] <= 1 and values["asr_images"] == 48
        assert values["attributable_asr"] == pytest.approx(values["asr"] - values["control_asr"])
        assert row["summary"]["ca"]["n"] == 1 and row["summary"]["ca"]["low"] is None  # one seed: no interval
    assert (out / "seed3" / "simclr-clean" / "eval-sslbkd.json").exists()
    assert (out / "seed3" / "simclr-sslbkd" / "poison_manifest.jsonl").exists()


def test_defense_experiment_on_a_moco_v2_checkpoint(tmp_path, make_shards):
    """The defense kind of experiment on an image method other than SimCLR: a MoCo v2 run poisoned by NA, then MCLDef
    from its checkpoint (one seed, two defense steps)."""
    shards = make_shards(n=96, per_shard=32)
    attack = write_attack(
        tmp_path / "na.yaml", "poisoning.NoisyAlignment", target_class=1, rate=0.25, reference_pool_size=10
    )
    common = [
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        f"--data.init_args.train_shards={shards}",
        f"--data.init_args.val_shards={shards}",
        f"--data.init_args.test_shards={shards}",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=48",
        "--data.init_args.num_workers=0",
        "--data.init_args.knn_bank_size=96",
    ]
    moco = ["--model.init_args.proj_hidden_dim=32", "--model.init_args.queue_size=64"]
    encoder = ["--model.init_args.width=8", "--model.init_args.knn_k=5", "--model.init_args.probe_epochs=3"]
    mcldef = [
        *encoder,
        "--model.init_args.inversion_steps=8",
        "--model.init_args.inversion_check_every=4",
        "--model.init_args.inversion_batch_size=16",
        "--model.init_args.inversion_samples=32",
        "--data.init_args.train_fraction=0.5",
    ]
    plan = {
        "seeds": [0],
        "common": common,
        "pretrain": {"configs": ["configs/smoke/moco_v2_shapes.yaml", attack], "overrides": [*encoder, *moco]},
        "defense_budget": {"steps": 2, "batch_size": 16},
        "defenses": {"mcldef": {"configs": ["configs/defense/mcldef_simclr.yaml"], "overrides": mcldef}},
    }
    config = tmp_path / "moco.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 0

    pretrained = yaml.safe_load((out / "seed0" / "poisoned" / "config.yaml").read_text())
    assert pretrained["model"]["class_path"] == "lightning_modules.MoCoV2"
    table = json.loads((out / "table.json").read_text())
    assert [row["name"] for row in table["rows"]] == ["poisoned (no defense)", "mcldef"]
    for row in table["rows"]:
        values = row["per_seed"]["0"]
        assert set(values) >= {*METRICS, "asr_images"}
        for name in ("ca", "asr", "control_asr", "attributable_asr", "clean_to_target", "flip_rate"):
            assert math.isfinite(values[name]) and 0 <= abs(values[name]) <= 1, (row["name"], name)
            assert row["summary"][name]["n"] == 1 and row["summary"][name]["mean"] == values[name]
        assert values["attributable_asr"] == pytest.approx(values["asr"] - values["control_asr"])
        assert values["asr_images"] == 72  # the 96 images less the 24 of the target class
    defended = table["rows"][1]
    assert defended["steps"] == [2] and defended["samples"] == [32]
    report = json.loads((out / "seed0" / "mcldef" / "defense_metrics.json").read_text())
    assert report["defense"] == "mcldef"
    assert report["poisoned_checkpoint"] == str((out / "seed0" / "poisoned" / "checkpoints" / "last.ckpt").resolve())
    assert "| mcldef |" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"attack_target": "banana"}, "target_class='banana' is not a class of the eval set"),
        ({"only_target": True}, "holds only images of the target class"),
        ({"defense_budget": {"steps": 0}}, "defense_budget.steps"),
        ({"base": {"configs": []}}, "base.configs is empty"),
        ({"base": {"configs": ["configs/smoke/clip_shapes.yaml"], "seed": "one"}}, "base.seed must be an integer"),
    ],
)
def test_experiment_errors_name_the_field_before_compute(tmp_path, make_shards, capsys, change, message):
    classes = 1 if change.get("only_target") else 4
    shards = make_shards(n=8, per_shard=8, captions=True, classes=classes)
    target = change.get("attack_target", "class0")
    attack = write_attack(tmp_path / "attack.yaml", "poisoning.BadNet", target_class=target, rate=0.3)
    plan = {
        "seeds": change.get("seeds", [0]),
        "common": clip_overrides(shards),
        "pretrain": {"configs": ["configs/smoke/clip_shapes.yaml", attack]},
        "defenses": {"cleanclip": {"configs": ["configs/defense/cleanclip.yaml"]}},
    }
    for key in ("defense_budget", "base"):
        if key in change:
            plan[key] = change[key]
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "o"
    assert experiment_main(["--config", str(config), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing ran


def test_experiment_file_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"pretrain": {"configs": ["configs/smoke/clip_shapes.yaml"]}, "defenses": {}}))
    assert experiment_main(["--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "at least one attack config" in capsys.readouterr().err


def test_t_interval_over_seeds():
    stat = interval([0.2, 0.3, 0.4])
    # mean 0.3, s = 0.1, t(0.975, 2) = 4.303: half-width 4.303 * 0.1 / sqrt(3)
    assert stat["mean"] == pytest.approx(0.3) and stat["high"] - stat["mean"] == pytest.approx(0.24844, abs=1e-4)
    assert interval([0.5])["low"] is None and interval([None, None])["mean"] is None


def test_schedule_ends_where_training_stops():
    # UBT's config sets max_steps 500; an experiment that also caps epochs used to size the cosine for 500 steps
    # and stop at 78: the schedule now ends at the first limit reached.
    module = CLIP(model_name="clip-tiny-vit")
    data = SimpleNamespace(train_batches_per_rank=lambda: 39)
    trainer = SimpleNamespace(
        max_steps=500, max_epochs=2, limit_train_batches=1.0, accumulate_grad_batches=1, datamodule=data
    )
    module._trainer = trainer
    assert module.total_steps() == 78
    trainer.max_epochs = -1
    assert module.total_steps() == 500
    trainer.max_steps, trainer.max_epochs = -1, 3
    assert module.total_steps() == 117


@pytest.mark.parametrize("path", sorted(Path("configs/experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_experiments_load(path, tmp_path):
    name = path.stem
    plan = load_plan(path)
    assert plan["seeds"] == [0, 1, 2]
    arms = expand(plan, tmp_path)
    assert len({arm.id for arm in arms}) == len(arms)  # stable, distinct ids
    if "shapes" in name:  # the built-in data is there to check against; CIFAR-10 shards are the user's
        check_before_compute(plan)


def test_clean_reference_leaves_out_the_attacks_overrides(tmp_path):
    """A bed at another poisoning rate has the same clean reference: the rate names nothing without the attack."""
    low = load_plan(Path("configs/experiment/clip_testbed_patch_budgets.yaml"))
    high = load_plan(Path("configs/experiment/clip_testbed_patch10_budgets.yaml"))
    arms = {name: {arm.id: arm for arm in expand(plan, tmp_path)} for name, plan in (("low", low), ("high", high))}
    clean, poisoned = arms["high"]["seed0/clean"].fit, arms["high"]["seed0/poisoned"].fit
    assert "--data.init_args.attack.init_args.rate=0.1" in poisoned
    assert not [arg for arg in clean if arg.startswith("--data.init_args.attack")]
    assert clean == arms["low"]["seed0/clean"].fit
    assert arms["high"]["seed0/poisoned"].fit != arms["low"]["seed0/poisoned"].fit


def test_arms_run_anywhere_and_assemble_into_the_same_table(tmp_path, make_shards, capsys):
    """A budget ladder's arms: listed with their needs, run one by one (a defense only where its poisoned model is),
    exported without checkpoints, and assembled elsewhere into the same table, number for number; an exported arm
    made by another command is refused, a missing one named."""
    shards = make_shards(n=64, per_shard=32, captions=True)
    attack = write_attack(tmp_path / "attack.yaml", "poisoning.BadNet", target_class="class1", rate=0.3, trigger_size=6)
    finetune = {"configs": ["configs/defense/cleanclip.yaml"], "overrides": ["--model.init_args.lambda_unimodal=0.0"]}
    ladder = [{"steps": 1, "batch_size": 16}, {"steps": 2, "batch_size": 16, "lr": 1.0e-4}]
    plan = clip_plan(shards, attack, {"finetune": finetune}, defense_budgets=ladder)
    plan["seeds"] = [0]
    config = tmp_path / "ladder.yaml"
    config.write_text(yaml.safe_dump(plan))
    out = tmp_path / "out"
    run = ["--config", str(config), "--out", str(out)]

    assert experiment_main([*run, "--list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(a["id"], a["stage"], a["state"]) for a in listed] == [
        ("seed0/clean", 0, "pending"),
        ("seed0/poisoned", 0, "pending"),
        ("seed0/finetune@1x16", 1, "pending"),
        ("seed0/finetune@2x16x0.0001", 1, "pending"),
    ]
    assert listed[2]["needs"] == ["seed0/poisoned"]
    assert listed[1]["evaluations"] == ["eval.json"] and listed[2]["evaluations"] == []  # each a clbd test
    # A defense arm runs only where its poisoned model's checkpoint is.
    assert experiment_main([*run, "--arm", "seed0/finetune@1x16"]) == 2
    assert "starts from seed0/poisoned, not finished" in capsys.readouterr().err
    assert experiment_main([*run, "--arm", "seed0/poisoned"]) == 0
    assert not (out / "table.json").exists()  # one arm: no table
    assert experiment_main(run) == 0
    table = json.loads((out / "table.json").read_text())
    names = [row["name"] for row in table["rows"]]
    assert names == [
        "clean reference",
        "poisoned (no defense)",
        "finetune @ 1 steps, batch 16",
        "finetune @ 2 steps, batch 16, lr 0.0001",
    ]
    assert [row.get("steps") for row in table["rows"][2:]] == [[1], [2]]  # each budget, as run
    saved = yaml.safe_load((out / "seed0" / "finetune@2x16x0.0001" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr"] == 1.0e-4 and saved["data"]["init_args"]["batch_size"] == 16
    assert set(table["smallest_budgets"]) == {"finetune"}
    assert (out / "budget_curves.png").exists() and (out / "tradeoff.png").exists()
    provenance = json.loads((out / "seed0" / "poisoned" / "provenance.json").read_text())
    assert provenance["device"].startswith("cpu") and provenance["precision"] == "32-true"
    assert provenance["wall_s"]["fit"] > 0 and provenance["wall_s"]["eval.json"] > 0 and provenance["epochs"] == 1
    assert set(provenance["versions"]) >= {"torch", "cuda", "cudnn", "lightning"}
    # Every clbd run times its epochs (lightning_modules.epoch_timer): the training alone, not start-up and monitors.
    assert provenance["epoch_s_source"] == "median of time/train_epoch_s (training only)"
    assert 0 < provenance["epoch_s"] < provenance["wall_s"]["fit"]

    exported = tmp_path / "results"
    assert experiment_main([*run, "--export", str(exported)]) == 0
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert "seed0/poisoned/eval.json" in files and "seed0/finetune@1x16/defense_metrics.json" in files
    assert not any(f.endswith(".ckpt") for f in files)
    # Assembled elsewhere from the exported folders alone: the same rows, number for number.
    other = tmp_path / "assembled"
    assert experiment_main(["--config", str(config), "--out", str(other), "--assemble", "--from", str(exported)]) == 0
    again = json.loads((other / "table.json").read_text())
    assert [(r["name"], r["per_seed"], r["seeds"]) for r in again["rows"]] == [
        (r["name"], r["per_seed"], r["seeds"]) for r in table["rows"]
    ]
    assert (other / "table.md").read_text() == (out / "table.md").read_text()
    # Speed settings, comments and layout change no arm: a plan and config files that differ only there still take it.
    plan["common"] = [*plan["common"], "--data.init_args.num_workers=2", "--trainer.enable_progress_bar=true"]
    faster = tmp_path / "faster.yaml"
    faster.write_text(yaml.safe_dump(plan))
    Path(attack).write_text("# the same attack\n" + Path(attack).read_text())
    assert experiment_main(["--config", str(faster), "--out", str(other), "--assemble", "--from", str(exported)]) == 0
    assert [r["per_seed"] for r in json.loads((other / "table.json").read_text())["rows"]] == [
        r["per_seed"] for r in table["rows"]
    ]
    # A missing arm is named; an arm whose record names another command is refused.
    import shutil

    shutil.rmtree(exported / "seed0" / "clean")
    assert experiment_main(["--config", str(config), "--out", str(other), "--assemble", "--from", str(exported)]) == 0
    assert "Still missing (1 arms): seed0/clean" in (other / "table.md").read_text()
    record = exported / "seed0" / "poisoned" / "experiment_command.json"
    record.write_text(record.read_text().replace("--seed_everything=0", "--seed_everything=9"))
    assert experiment_main(["--config", str(config), "--out", str(other), "--assemble", "--from", str(exported)]) == 2
    assert "seed0/poisoned was made by another command" in capsys.readouterr().err
    # A clean model's evaluation under one attack's trigger never stands for another attack's: the clean fit is the
    # same command, its eval.json is refused by name.
    arrow = write_attack(tmp_path / "other.yaml", "poisoning.BadNet", target_class="class2", rate=0.3, trigger_size=6)
    plan["pretrain"]["configs"] = ["configs/smoke/clip_shapes.yaml", arrow]
    config.write_text(yaml.safe_dump(plan))
    assert experiment_main([*run, "--arm", "seed0/clean"]) == 2
    assert "seed0/clean/eval.json was evaluated by another command" in capsys.readouterr().err


def test_suppression_and_smallest_budget_against_the_control():
    from clbd.experiment.table import mark_suppression, smallest_budgets

    def row(name, role, defense=None, index=None, asr=0.0, ca=0.5, target=0.6):
        values = {"attributable_asr": asr, "ca": ca, "target_accuracy": target}
        summary = {k: {"mean": v} for k, v in values.items()}
        label = None if index is None else f"budget {index}"
        return {
            "name": name,
            "role": role,
            "defense": defense,
            "budget_index": index,
            "budget_label": label,
            "group": "" if role == "clean" else "clean reference",
            "summary": summary,
            "per_seed": {"0": values},
        }

    rows = [
        row("clean reference", "clean", target=0.65),
        row("poisoned (no defense)", "poisoned", asr=0.66),
        row("finetune a", "defense", "finetune", 0, asr=0.60),
        row("finetune b", "defense", "finetune", 1, asr=0.20),
        row("cleanclip a", "defense", "cleanclip", 0, asr=0.30),
        row("cleanclip b", "defense", "cleanclip", 1, asr=0.04, ca=0.49, target=0.60),
        row("tacleaner a", "defense", "tacleaner", 0, asr=0.02, target=0.29),
        row("tacleaner b", "defense", "tacleaner", 1, asr=0.01, target=0.20),
    ]
    mark_suppression(rows)
    assert [r["suppression"] for r in rows] == [False, False, False, False, False, False, True, True]
    found = smallest_budgets({"control": "finetune"}, rows)
    assert found["cleanclip"]["budget"] == "budget 1" and found["cleanclip"]["control_attributable_asr"] == 0.20
    assert found["cleanclip"]["goal"] == {
        "control_still_backdoored": False,
        "ca_kept": True,
        "target_kept": True,
        "met": False,
    }
    assert found["tacleaner"]["budget"] == "budget 0" and found["tacleaner"]["goal"]["target_kept"] is False
    assert found["tacleaner"]["goal"]["control_still_backdoored"] is True
    assert found["finetune"]["budget"] is None and found["finetune"]["best_attributable_asr"] == 0.20


def test_portable_paths_read_the_same_on_any_machine(tmp_path, monkeypatch):
    """Paths under --out read {out}/... whether they exist yet or not, given relative or absolute; files under the
    working directory read relative to it (a symlink kept as named); anything else is left as it is."""
    from clbd.experiment.runs import portable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("x: 1\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "elsewhere")
    argv = [
        "--config",
        str(tmp_path / "configs" / "a.yaml"),
        "--model.init_args.checkpoint=results/plan/seed0/poisoned/checkpoints/last.ckpt",
        f"--data.init_args.train_shards={tmp_path / 'data'}",
        "--model.init_args.lr=0.1",
        "--data.init_args.val_shards=builtin:shapes/val",
    ]
    assert portable(argv, Path("results/plan")) == [
        "--config",
        "configs/a.yaml",
        "--model.init_args.checkpoint={out}/seed0/poisoned/checkpoints/last.ckpt",
        "--data.init_args.train_shards=data",
        "--model.init_args.lr=0.1",
        "--data.init_args.val_shards=builtin:shapes/val",
    ]
    assert portable(argv, tmp_path / "results" / "plan")[2] == argv[2].replace("results/plan", "{out}")


def test_a_defense_keeps_one_colour_and_none_is_drawn_in_the_suppression_marks_red():
    from matplotlib.colors import to_rgb

    from clbd.experiment.charts import PALETTE, defense_colours

    names = ("ubt_cosine", "cleanclip", "finetune", "ubt")
    rows = [{"role": "clean"}] + [{"role": "defense", "defense": name} for name in names] * 2
    colours = defense_colours({"rows": rows}, control="finetune")
    assert colours == {"finetune": "black", "ubt_cosine": PALETTE[4], "cleanclip": PALETTE[0], "ubt": PALETTE[3]}
    # a seed defense keeps its colour whatever else the plan holds
    assert defense_colours({"rows": rows[4:5]}, control="finetune")["ubt"] == PALETTE[3]
    red = to_rgb("red")
    assert all(max(abs(a - b) for a, b in zip(to_rgb(c), red)) > 0.3 for c in PALETTE)
    assert len({to_rgb(c) for c in PALETTE}) == len(PALETTE)
