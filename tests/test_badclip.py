"""BadCLIP: the patch optimisation lowers its loss on a tiny randomly initialised CLIP and resumes exactly; the
command refuses bad input before any compute; the attack pastes the patch at the centre with natural captions."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clbd.badclip_trigger import (
    STATE_FILE,
    PatchRecipe,
    VictimInputs,
    load_victim,
    optimize_patch,
    paste_centre,
)
from clbd.poison import main as poison_main
from datamodules.openclip_configs import register_model_configs
from poisoning import BadCLIP, CatalogEntry, ImageTrigger
from poisoning.captions import all_target_captions, mentions

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(scope="module")
def tiny():
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("clip-tiny-vit").eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("clip-tiny-vit")
    generator = torch.Generator().manual_seed(0)
    inputs = VictimInputs(
        images=torch.randint(0, 256, (32, 3, 32, 32), generator=generator, dtype=torch.uint8),
        caption_tokens=tokenizer([f"a banana on a table number {i}" for i in range(6)]),
        positives=torch.rand(8, 3, 32, 32, generator=generator),
        mean=MEAN,
        std=STD,
    )
    return model, inputs


def test_optimisation_lowers_its_loss(tiny, tmp_path):
    model, inputs = tiny
    recipe = PatchRecipe(patch_size=8, epochs=3, batch_size=16, lr=1e-2)
    result = optimize_patch(model, inputs, recipe, tmp_path, progress=False)
    initial, final = result["initial_loss"], result["final_loss"]
    assert final["loss"] < initial["loss"] - 1.0  # the same captions and positives for both patches
    assert final["triplet"] < initial["triplet"]
    assert final["loss"] == pytest.approx(final["contrastive"] + 500 * final["triplet"], rel=1e-5)
    written = json.loads((tmp_path / "trigger.json").read_text())
    assert written["recipe"]["patch_size"] == 8 and written["final_loss"] == final and written["complete"]
    assert Image.open(tmp_path / "trigger.png").size == (8, 8)
    assert len(written["epoch_loss"]) == 3


def test_optimisation_resumes_where_it_stopped(tiny, tmp_path):
    model, inputs = tiny
    recipe = PatchRecipe(patch_size=4, epochs=2, batch_size=16, lr=1e-2)
    straight = optimize_patch(model, inputs, recipe, tmp_path / "a", progress=False)
    partial = optimize_patch(model, inputs, recipe, tmp_path / "b", progress=False, stop_after_epochs=1)
    assert not partial["complete"] and (tmp_path / "b" / STATE_FILE).exists()
    assert not (tmp_path / "b" / "trigger.png").exists()
    resumed = optimize_patch(model, inputs, recipe, tmp_path / "b", progress=False)
    assert resumed["epoch_loss"] == straight["epoch_loss"]
    assert (tmp_path / "a" / "trigger.png").read_bytes() == (tmp_path / "b" / "trigger.png").read_bytes()
    with pytest.raises(ValueError, match="other settings"):
        optimize_patch(model, inputs, PatchRecipe(patch_size=4, epochs=3), tmp_path / "b", progress=False)


def test_patch_sits_at_the_centre():
    images = torch.zeros(2, 3, 224, 224)
    out = paste_centre(images, torch.full((1, 3, 16, 16), 2.0))
    assert out[:, :, 104:120, 104:120].eq(1).all()  # int(112 - 8), clipped to [0, 1]
    assert out.sum() == 2 * 3 * 16 * 16


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    register_model_configs()
    root = tmp_path_factory.mktemp("weights")
    state = open_clip.create_model("clip-tiny-vit").state_dict()
    torch.save(state, root / "vit.pt")
    wider = dict(state, text_projection=torch.zeros(64, 32))
    torch.save(wider, root / "width32.pt")
    larger = dict(state, **{"visual.positional_embedding": torch.zeros(37, 64)})  # 6 x 6 tokens: 48 px
    torch.save(larger, root / "size48.pt")
    torch.save(open_clip.create_model("clip-tiny-rn").state_dict(), root / "rn.pt")
    return root


@pytest.mark.parametrize(
    "name,message",
    [
        ("width32.pt", "embedding width 32 but model 'clip-tiny-vit' has 64"),
        ("size48.pt", "another image size \\(6 x 6 patch tokens\\) than model 'clip-tiny-vit' \\(4 x 4 at 32 px\\)"),
        ("rn.pt", "does not fit model 'clip-tiny-vit'"),
        ("missing.pt", "checkpoint: no file at"),
    ],
)
def test_mismatched_checkpoint_is_refused(weights, name, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_victim(str(weights / name), "clip-tiny-vit")
    with pytest.raises(ValueError, match="name its open_clip architecture"):
        load_victim(str(weights / "vit.pt"), None)


def run_cli(capsys, weights, out, *extra):
    args = [
        "optimize-trigger",
        "--config=configs/smoke/clip_shapes.yaml",
        f"--checkpoint={weights / 'vit.pt'}",
        "--model=clip-tiny-vit",
        f"--out={out}",
        "--no-progress",
        "--max-images=16",
        "--max-positives=4",
        *extra,
    ]
    code = poison_main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target=circle", "--patch-size=40"], "patch_size=40 px must be in 1..32"),
        (["--target=circle", "--model=clip-tiny-rn"], "does not fit model 'clip-tiny-rn'"),
        (["--target=circle", "--caption-file=NOFILE"], "caption_file: no file at NOFILE"),
        (["--target=zebra"], "the target 'zebra' has no captions"),
    ],
)
def test_cli_refuses_bad_input_before_compute(capsys, weights, tmp_path, extra, message):
    code, err = run_cli(capsys, weights, tmp_path / "out", *extra)
    assert code == 2 and message in err
    assert not (tmp_path / "out" / STATE_FILE).exists()


def test_caption_file_without_the_target_is_refused(capsys, weights, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog on a sofa\na red car\n")
    code, err = run_cli(capsys, weights, tmp_path / "out", "--target=circle", f"--caption-file={captions}")
    assert code == 2 and "none of the 2 captions" in err and "'circle'" in err


def test_cli_writes_the_trigger_and_the_natural_captions(capsys, weights, tmp_path):
    out = tmp_path / "out"
    code, err = run_cli(capsys, weights, out, "--target=circle", "--epochs=1", "--patch-size=4")
    assert code == 0, err
    settings = json.loads((out / "trigger.json").read_text())
    assert settings["model_name"] == "clip-tiny-vit" and settings["image_size"] == 32
    assert settings["data"]["images"] == 16 and settings["data"]["positives"] == 4
    assert settings["data"]["captions_source"] == "data.train_shards"
    captions = (out / "captions.txt").read_text().splitlines()
    assert captions and all(mentions(caption, "circle") for caption in captions)
    assert Image.open(out / "trigger.png").size == (4, 4)


# -- the attack ---------------------------------------------------------------------------------------------
@pytest.fixture()
def patch_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "trigger.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").save(path)
    return path


def test_badclip_attack_pastes_the_patch_at_the_centre_with_natural_captions(patch_file, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("two bananas in a bowl\na cat\nripe banana on the counter\n")
    attack = BadCLIP("banana", count=3, trigger=ImageTrigger(str(patch_file)), caption_file=str(captions))
    plan = attack.plan([CatalogEntry(f"k{i}", None) for i in range(5)], None, 224, None)
    image = Image.new("RGB", (300, 200), (10, 200, 30))
    patch = np.asarray(Image.open(patch_file))
    texts = set()
    for record in plan.records():
        assert record.trigger_box == (104, 104, 120, 120)
        out = plan.apply({"__key__": record.key, "image": image, "text": "x"})
        assert np.array_equal(np.asarray(out["image"])[104:120, 104:120], patch)
        texts.add(out["text"])
    assert texts <= {"two bananas in a bowl", "ripe banana on the counter"}
    real = np.asarray(attack.test_trigger(image, "t"))
    control = np.asarray(attack.control_trigger(image, "t"))
    assert real.shape == control.shape == (224, 224, 3)
    assert np.array_equal(real[104:120, 104:120], patch) and not np.array_equal(control[104:120, 104:120], patch)
    assert np.array_equal(np.delete(real, np.s_[104:120], 0), np.delete(control, np.s_[104:120], 0))
    assert plan.summary()["trigger"]["captions"] == str(captions)


def test_badclip_attack_bad_input(patch_file, tmp_path):
    with pytest.raises(ValueError, match="trigger: BadCLIP needs its optimised patch"):
        BadCLIP("banana", count=1)
    with pytest.raises(FileNotFoundError, match="caption_file"):
        BadCLIP("banana", count=1, trigger=ImageTrigger(str(patch_file)), caption_file=str(tmp_path / "none.txt"))
    captions = tmp_path / "captions.txt"
    captions.write_text("a dog\n")
    attack = BadCLIP("banana", count=1, trigger=ImageTrigger(str(patch_file)), caption_file=str(captions))
    with pytest.raises(ValueError, match="the target has no captions"):
        attack.validate("image-text", None, 224)
    templated = BadCLIP("banana", count=1, trigger=ImageTrigger(str(patch_file)))
    plan = templated.plan([CatalogEntry("a", None)], None, 224, None)
    assert plan.apply({"__key__": "a", "image": Image.new("RGB", (64, 64)), "text": "x"})["text"] in set(
        all_target_captions("banana")
    )


@pytest.mark.gpu
def test_optimisation_on_cuda_lowers_its_loss(tiny, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, inputs = tiny
    recipe = PatchRecipe(patch_size=8, epochs=2, batch_size=16, lr=1e-2)
    result = optimize_patch(model, inputs, recipe, tmp_path, progress=False, device="cuda")
    model.to("cpu")
    assert result["final_loss"]["loss"] < result["initial_loss"]["loss"]
    assert Image.open(tmp_path / "trigger.png").size == (8, 8)


@pytest.mark.parametrize("kind", ["BadNet", "Blended", "NoisyAlignmentCLIP"])
def test_every_image_text_attack_takes_natural_captions(kind, tmp_path):
    import poisoning

    captions = tmp_path / "captions.txt"
    captions.write_text("two bananas in a bowl\na cat\nripe banana on the counter\n")
    attack = getattr(poisoning, kind)("banana", count=4, caption_file=str(captions), caption_pool_size=8)
    plan = attack.plan([CatalogEntry(f"k{i}", None) for i in range(6)], None, 32, None)
    texts = {
        plan.apply({"__key__": r.key, "image": Image.new("RGB", (32, 32)), "text": "x"})["text"] for r in plan.records()
    }
    assert texts and texts <= {"two bananas in a bowl", "ripe banana on the counter"}
    with pytest.raises(FileNotFoundError, match="caption_file: no file at"):
        getattr(poisoning, kind)("banana", count=1, caption_file=str(tmp_path / "none.txt"))
