"""MCLDef end to end on CPU: a tiny poisoned SimCLR / MoCo v2 / CLIP run, then the defense through ``clbd fit``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from clbd import main
from datamodules.shards import ShardSink
from defenses.mcldef import model_contrastive_loss
from defenses.trigger_inversion import (
    InversionConfig,
    PixelNormalizer,
    compare_with_attack_trigger,
    invert_trigger,
    trigger_success,
)
from tests.callbacks import SimulatedPreemption
from tests.conftest import png_bytes, solid_class_image

CLASSES = 4


def write_shards(folder: Path, prefix: str, n: int, captions: bool = False) -> Path:
    """Real PNG shards with 4 labelled classes (captions for CLIP): ``folder/{prefix}.index.json``."""
    names = [f"class{c}" for c in range(CLASSES)]
    with ShardSink(folder, prefix, maxcount=40, classes=names) as sink:
        for i in range(n):
            label = i % CLASSES
            members: dict = {"png": png_bytes(solid_class_image(label, i)), "cls": label}
            if captions:
                members["txt"] = f"a photo of a {names[label]} number {i}"
            sink.write(f"{prefix}{i:05d}", members)
    return folder / f"{prefix}.index.json"


SIMCLR_MODEL = ["--model.init_args.width=8", "--model.init_args.proj_hidden_dim=32"]
MOCO_MODEL = [*SIMCLR_MODEL, "--model.init_args.queue_size=64"]
MCLDEF_IMAGE_MODEL = ["--model.init_args.width=8"]  # MCLDef loads only the encoder of an image method
SIMCLR_NA = [
    "--data.init_args.attack=poisoning.NoisyAlignment",
    "--data.init_args.attack.target_class=1",
    "--data.init_args.attack.rate=0.25",
    "--data.init_args.attack.reference_pool_size=10",
]
CLIP_MODEL = ["--model.init_args.model_name=clip-tiny-vit"]
CLIP_DATA = ["--data.init_args.model_name=clip-tiny-vit"]


def clip_badnet(target: str = "class1", rate: float = 0.25) -> list[str]:
    return [
        "--data.init_args.attack=poisoning.BadNet",
        f"--data.init_args.attack.target_class={target}",
        f"--data.init_args.attack.rate={rate}",
    ]


def quick_trainer(run: Path, steps: int | None = None) -> list[str]:
    args = [
        f"--trainer.default_root_dir={run}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
    ]
    return args + ([f"--trainer.max_steps={steps}"] if steps else [])


def pretrain(run: Path, kind: str, train: Path, val: Path) -> Path:
    """A tiny poisoned pretraining run (one epoch, a high poisoning rate); returns its last checkpoint."""
    if kind in ("simclr", "moco_v2"):
        model = ["--model=lightning_modules.SimCLR", *SIMCLR_MODEL] if kind == "simclr" else []
        model = model or ["--model=lightning_modules.MoCoV2", *MOCO_MODEL]
        args = [*model, "--model.init_args.optimizer=sgd", "--data=datamodules.SimCLRDataModule", *SIMCLR_NA]
    else:
        args = ["--model=lightning_modules.CLIP", *CLIP_MODEL, "--data=datamodules.CLIPDataModule", *CLIP_DATA]
        args += clip_badnet()
    args += [
        f"--data.init_args.train_shards={train}",
        f"--data.init_args.val_shards={val}",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        *quick_trainer(run, steps=4),
    ]
    assert main(["fit", *args]) == 0
    return run / "checkpoints" / "last.ckpt"


def data_args(train: Path, val: Path, fraction: float = 0.5, batch: int = 16) -> list[str]:
    return [
        f"--data.init_args.train_shards={train}",
        f"--data.init_args.val_shards={val}",
        f"--data.init_args.train_fraction={fraction}",
        f"--data.init_args.batch_size={batch}",
        "--data.init_args.eval_batch_size=32",
        "--data.init_args.num_workers=0",
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcldef-shards")
    return {
        "simclr_train": write_shards(root / "simclr", "train", 160),
        "simclr_val": write_shards(root / "simclr", "val", 40),
        "clip_train": write_shards(root / "clip", "train", 160, captions=True),
        "clip_val": write_shards(root / "clip", "val", 40, captions=True),
    }


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, shards) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcldef-poisoned")
    return {
        "simclr": pretrain(root / "simclr", "simclr", shards["simclr_train"], shards["simclr_val"]),
        "moco_v2": pretrain(root / "moco_v2", "moco_v2", shards["simclr_train"], shards["simclr_val"]),
        "clip": pretrain(root / "clip", "clip", shards["clip_train"], shards["clip_val"]),
    }


MCLDEF_QUICK = [
    "--model.init_args.inversion_steps=12",
    "--model.init_args.inversion_check_every=4",
    "--model.init_args.inversion_batch_size=16",
]


def run_mcldef_simclr(run: Path, checkpoint: Path, shards: dict[str, Path], extra: list[str] = ()) -> int:
    return main(
        [
            "fit",
            "--config=configs/defense/mcldef_simclr.yaml",
            f"--model.init_args.checkpoint={checkpoint}",
            *MCLDEF_IMAGE_MODEL,
            *MCLDEF_QUICK,
            "--model.init_args.inversion_samples=48",
            "--model.init_args.probe_epochs=5",
            *SIMCLR_NA,
            *data_args(shards["simclr_train"], shards["simclr_val"]),
            "--data.init_args.knn_bank_size=80",
            *quick_trainer(run, steps=3),
            *extra,
        ]
    )


def run_mcldef_clip(run: Path, checkpoint: Path, shards: dict[str, Path], extra: list[str] = ()) -> int:
    return main(
        [
            "fit",
            "--config=configs/defense/mcldef_clip.yaml",
            f"--model.init_args.checkpoint={checkpoint}",
            *CLIP_MODEL,
            *MCLDEF_QUICK,
            "--model.init_args.inversion_samples=32",
            *clip_badnet(),
            *CLIP_DATA,
            *data_args(shards["clip_train"], shards["clip_val"]),
            *quick_trainer(run, steps=3),
            *extra,
        ]
    )


def check_inverted_trigger(run: Path, report: dict, image_size: int) -> None:
    inverted = report["extra"]["inverted_trigger"]
    for name in ("mask", "pattern", "trigger"):
        path = run / f"mcldef_{name}.png"
        assert Path(inverted["pngs"][name]) == path and path.exists()
        with Image.open(path) as image:
            assert image.size == (image_size, image_size)
            assert image.mode == ("L" if name == "mask" else "RGB")
    comparison = inverted["comparison_with_attack_trigger"]
    assert 0 < comparison["mask_l1"] <= image_size * image_size
    assert comparison["true_trigger_area"] > 0 and comparison["placements"] == inverted["images"]
    assert 0 <= comparison["mask_mass_in_trigger_region"] <= 1
    assert 0 < comparison["trigger_region_image_fraction"] <= 1
    assert inverted["target"] == 1 and inverted["target_name"] == "class1"
    assert inverted["success_on_clean_set"] is None or 0 <= inverted["success_on_clean_set"] <= 1
    # the inversion and its success count the images the trigger must flip: not the target class's
    assert 0 < inverted["non_target_images"] < inverted["images"]
    assert inverted["success_images"] == inverted["non_target_images"]
    assert len(inverted["history"]) == 3  # 12 steps, a check every 4


@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_mcldef_image_method_end_to_end(tmp_path, shards, poisoned, method):
    source = poisoned[method]
    digest = sha256(source)
    run = tmp_path / "mcldef"
    assert run_mcldef_simclr(run, source, shards) == 0

    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["defense"] == "mcldef" and report["poisoned_checkpoint"] == str(source.resolve())
    for stage in ("before", "after"):
        result = report[stage]
        assert result["knn"]["n_images"] == 40 and result["linear_probe"]["n_images"] == 40
        assert result["linear_probe"]["asr_images"] == 30  # the 10 target-class test images are left out
        assert 0 <= result["linear_probe"]["accuracy"] <= 1
    check_inverted_trigger(run, report, image_size=32)
    assert report["extra"]["inverted_trigger"]["classifier"]["probe_train_images"] == 48
    assert report["extra"]["purification"]["train_fraction"] == 0.5

    # Only the encoder is loaded and moved (the method's heads, momentum networks and queue stay behind); the
    # frozen backdoored copy is not part of the saved model.
    before = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 3
    encoder = {k for k in before if k.startswith("encoder.")}
    assert set(after["state_dict"]) == encoder and len(before) > len(encoder)
    assert any(not torch.equal(before[k], after["state_dict"][k]) for k in encoder)
    assert after["clbd_mcldef"]["trigger"]["mask"].shape == (1, 32, 32)
    assert sha256(source) == digest  # the poisoned checkpoint is never written


def test_mcldef_clip_end_to_end(tmp_path, shards, poisoned):
    source = poisoned["clip"]
    digest = sha256(source)
    run = tmp_path / "mcldef"
    assert run_mcldef_clip(run, source, shards) == 0

    report = json.loads((run / "defense_metrics.json").read_text())
    for stage in ("before", "after"):
        result = report[stage]
        assert result["n_images"] == 40 and result["asr_images"] == 30
        assert 0 <= result["clean_accuracy_top1"] <= 1 and 0 <= result["asr_top1"] <= 1
    check_inverted_trigger(run, report, image_size=32)
    assert report["extra"]["inverted_trigger"]["classifier"]["classes"] == CLASSES

    # Only the image tower moved (text tower and temperature frozen).
    before = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(after) == set(before)
    visual = [k for k in before if k.startswith("model.visual.")]
    assert any(not torch.equal(before[k], after[k]) for k in visual)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in visual)
    assert sha256(source) == digest


@pytest.mark.parametrize(
    "method, option",
    [("simclr", "--data.init_args.views_on_device=true"), ("clip", "--data.init_args.images_on_device=true")],
)
def test_mcldef_inverts_on_views_or_images_made_on_the_device(tmp_path, shards, poisoned, method, option):
    """The inversion reads the training loader itself, outside Lightning's loop: its batches are made there too."""
    run = tmp_path / "mcldef"
    launch = run_mcldef_simclr if method == "simclr" else run_mcldef_clip
    assert launch(run, poisoned[method], shards, [option]) == 0
    report = json.loads((run / "defense_metrics.json").read_text())
    assert report["extra"]["inverted_trigger"]["images"] == (48 if method == "simclr" else 32)


def test_mcldef_clip_refuses_random_crops(tmp_path, shards, poisoned, capsys):
    """Stage 2 trains on un-augmented images, as the authors' loader: random resized crops are refused."""
    assert run_mcldef_clip(tmp_path / "run", poisoned["clip"], shards, ["--data.init_args.train_augment=true"]) == 2
    assert "data.train_augment: MCLDef purifies on un-augmented images" in capsys.readouterr().err


def test_mcldef_resumes_without_redoing_the_inversion(tmp_path, shards, poisoned):
    """Killed after step 2 (checkpoint at step 1) and resumed: same weights as straight through; the inversion ran once."""
    source = poisoned["simclr"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    every = ["--checkpoint.every_n_train_steps=1"]
    assert run_mcldef_simclr(straight, source, shards, every) == 0
    interrupt = ["--trainer.callbacks+=tests.callbacks.InterruptAfterStep", "--trainer.callbacks.step=2"]
    with pytest.raises(SimulatedPreemption):
        run_mcldef_simclr(interrupted, source, shards, [*every, *interrupt])
    for png in interrupted.glob("mcldef_*.png"):
        png.unlink()  # a resumed run must not need to redo stage 1 (it would write them again)
    resume = ["--ckpt_path", "last"]  # step 1's
    assert run_mcldef_simclr(interrupted, source, shards, [*every, *resume]) == 0
    assert not list(interrupted.glob("mcldef_*.png"))

    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert torch.equal(a["clbd_mcldef"]["trigger"]["mask"], b["clbd_mcldef"]["trigger"]["mask"])
    assert a["clbd_defense"]["before"] == b["clbd_defense"]["before"]


# ---- the pieces, on known answers ---------------------------------------------------------------------------
def test_inversion_recovers_a_known_trigger():
    """A classifier that says 'target' when a 4x4 red patch at (4, 4) is bright: the mask goes there."""
    normalizer = PixelNormalizer((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = normalizer.from_pixels(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))

    def classify(x: torch.Tensor) -> torch.Tensor:
        patch = normalizer.to_pixels(x)[:, 0, 4:8, 4:8].mean((1, 2))
        return torch.stack([torch.zeros_like(patch), 40 * (patch - 0.8)], 1)

    trigger = invert_trigger(classify, images, 1, normalizer, InversionConfig(steps=150, batch_size=16, check_every=10))
    assert trigger.reached_bound and trigger.success == 1.0
    comparison = compare_with_attack_trigger(trigger.mask, lambda size, key: (4, 4, 8, 8), ["any"])
    assert comparison["true_trigger_area"] == 16 and comparison["trigger_region_image_fraction"] == 16 / 1024
    assert comparison["mask_mass_in_trigger_region"] > 0.9 and comparison["mask_l1"] < 32
    stamped = normalizer.to_pixels(normalizer.stamp(images[:2], trigger.mask, trigger.pattern))
    expected = (1 - trigger.mask) * normalizer.to_pixels(images[:2]) + trigger.mask * trigger.pattern
    assert torch.allclose(stamped, expected, atol=1e-6)


def test_inversion_success_counts_only_non_target_images():
    """Half the images are of the target class (bright), which the classifier calls 'target' with or without a
    trigger; the other half are dark, and the random start's mask x pattern (mean ~0.25) cannot lift them over the
    threshold (0.5) in 3 steps at lr 0.1. Counted over all images the trigger would look half successful; over the
    non-target ones it flips none."""
    normalizer = PixelNormalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    labels = torch.tensor([1, 0] * 16)
    images = labels[:, None, None, None].float().expand(-1, 3, 8, 8).clone()  # target: all ones, others: zeros

    def classify(x: torch.Tensor) -> torch.Tensor:
        bright = x.mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(bright), 100 * (bright - 0.5)], 1)

    config = InversionConfig(steps=3, batch_size=8, check_every=1)
    every_image = invert_trigger(classify, images, 1, normalizer, config)
    assert 0.3 < every_image.success < 0.7  # target images inflate the unlabelled count
    trigger = invert_trigger(classify, images, 1, normalizer, config, labels)
    assert trigger.success == 0.0 and not trigger.reached_bound
    assert all(check["success"] == 0.0 for check in trigger.history)
    assert trigger_success(classify, images, labels, 1, normalizer, trigger) == {"rate": 0.0, "images": 16}
    with pytest.raises(ValueError, match="every inversion image is of the target class"):
        invert_trigger(classify, images[labels == 1], 1, normalizer, config, labels[labels == 1])


def test_model_contrastive_loss_matches_its_formula():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # cos 1
    negative = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # cos 0
    expected = -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1))
    assert torch.isclose(model_contrastive_loss(z, positive, negative, 0.5), expected)


# ---- bad input: one clear line, exit 2, before any compute --------------------------------------------------
def test_wrong_model_kind_is_refused(tmp_path, shards, poisoned, capsys):
    assert run_mcldef_simclr(tmp_path / "a", poisoned["clip"], shards) == 2
    assert "holds a CLIP model; this defense repairs ImageSSLModule models" in capsys.readouterr().err
    assert run_mcldef_clip(tmp_path / "b", poisoned["simclr"], shards) == 2
    assert "holds a SimCLR model; this defense repairs CLIP models" in capsys.readouterr().err
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_missing_checkpoint_is_refused(tmp_path, shards, capsys):
    assert run_mcldef_simclr(tmp_path / "a", tmp_path / "nowhere.ckpt", shards) == 2
    assert "model.checkpoint: no checkpoint file at" in capsys.readouterr().err


def test_train_fraction_smaller_than_a_batch_is_refused(tmp_path, shards, poisoned, capsys):
    assert run_mcldef_simclr(tmp_path / "a", poisoned["simclr"], shards, ["--data.init_args.train_fraction=0.05"]) == 2
    err = capsys.readouterr().err
    assert "data.train_fraction=0.05 keeps" in err and "fewer than one global batch" in err


def test_target_unknown_to_the_eval_set_is_refused(tmp_path, shards, poisoned, capsys):
    assert run_mcldef_clip(tmp_path / "a", poisoned["clip"], shards, clip_badnet(target="banana")) == 2
    err = capsys.readouterr().err
    assert "data.attack.target_class='banana' is not one of the eval classes" in err
    assert not (tmp_path / "a" / "defense_metrics.json").exists()


def test_defense_run_around_the_poisoned_run_is_refused(shards, poisoned, capsys):
    source = poisoned["simclr"]
    digest = sha256(source)
    # A fresh folder that holds the poisoned run (runs/simclr/checkpoints/last.ckpt under runs/).
    assert run_mcldef_simclr(source.parent.parent.parent, source, shards) == 2
    assert "a defense writes into its own run directory" in capsys.readouterr().err
    assert sha256(source) == digest
