"""The preview grid: small images are enlarged pixel-exactly, labels fit, bad rows fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.catalog import load_raw_samples
from poisoning import CatalogEntry, NoisyAlignmentCLIP
from poisoning.preview import CELL_HEIGHT, attack_rows, enlarge, render_grid


def checker(size: int = 32) -> Image.Image:
    cells = (np.add.outer(np.arange(size), np.arange(size)) % 2).astype(np.uint8) * 255
    return Image.fromarray(np.stack([cells, 255 - cells, cells], axis=-1), "RGB")


def test_enlarge_uses_integer_nearest_scaling():
    small = checker(32)
    big = enlarge(small)
    factor = CELL_HEIGHT // 32
    assert big.size == (32 * factor, 32 * factor)
    pixels = np.asarray(big)
    # Every source pixel becomes a flat factor x factor block (no blur between neighbours).
    assert np.array_equal(pixels[::factor, ::factor], np.asarray(small))
    assert np.array_equal(pixels[factor - 1 :: factor, factor - 1 :: factor], np.asarray(small))
    large = Image.new("RGB", (640, 480), (1, 2, 3))
    assert enlarge(large).size == (round(640 * CELL_HEIGHT / 480), CELL_HEIGHT)


def test_render_grid_writes_a_png(tmp_path):
    rows = [
        {
            "title": "noisy_alignment: s00001",
            "images": [checker(32), checker(32).resize((64, 32))],
            "labels": ["original", "poisoned"],
        },
        {"title": "blended", "images": [checker(32)], "labels": ["a very long caption " * 6]},
    ]
    out = tmp_path / "preview.png"
    render_grid(rows, str(out))
    image = Image.open(out)
    assert image.format == "PNG"
    assert image.height > 2 * CELL_HEIGHT and image.width >= 2 * CELL_HEIGHT
    # The enlarged 2:1 canvas is in the picture at twice the width of the square one.
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels != 255).any(axis=-1).sum() > (2 * CELL_HEIGHT) ** 2 // 2


def test_render_grid_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="rows"):
        render_grid([], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"rows\[0\].labels"):
        render_grid([{"title": "t", "images": [checker()], "labels": ["a", "b"]}], str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match=r"rows\[0\].images"):
        render_grid([{"title": "t", "images": []}], str(tmp_path / "x.png"))
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        render_grid([{"title": "t", "images": [checker()]}], str(tmp_path / "no-such-dir" / "x.png"))


def test_attack_rows_show_the_new_caption(tmp_path):
    attack = NoisyAlignmentCLIP(target_class="banana", count=2, seed=0)
    plan = attack.plan([CatalogEntry(f"k{i}") for i in range(10)], None, 32, None)
    samples = [{"__key__": r.key, "image": checker(40), "label": -1, "text": "a checkerboard"} for r in plan.records()]
    rows = attack_rows(
        attack, samples, plan, views=lambda image: (image.crop((0, 0, 16, 16)), image.crop((16, 16, 32, 32)))
    )
    assert len(rows) == 2 and len(rows[0]["images"]) == 4
    assert rows[0]["labels"][1] == plan.records()[0].caption
    render_grid(rows, str(tmp_path / "clip.png"))
    assert (tmp_path / "clip.png").stat().st_size > 0


def test_wrapped_text_keeps_every_character_within_the_width():
    from poisoning.preview import _font, wrap_text

    caption = "a photo of a circle shape drawn on a plain background, centred in the frame " + "x" * 60
    wrapped = wrap_text(caption, 150)
    assert wrapped.replace("\n", "").replace(" ", "") == caption.replace(" ", "")
    assert len(wrapped.splitlines()) > 3 and all(_font().getlength(line) <= 150 for line in wrapped.splitlines())


def test_clbd_preview_names_the_attack_as_configured_and_shows_whole_captions(tmp_path, make_shards):
    """The heading names the config file the attack came from (not the class's short name); captions are whole."""
    from clbd.poison import configured_attack, load_datamodule, preview, preview_heading, preview_rows

    shards = make_shards(n=40, per_shard=20, captions=True)
    base = tmp_path / "clip_base.yaml"
    base.write_text(
        "data:\n  class_path: datamodules.CLIPDataModule\n  init_args:\n"
        f"    train_shards: {shards}\n    val_shards: null\n    model_name: clip-tiny-vit\n    batch_size: 8\n"
    )
    attack = tmp_path / "corner_patch.yaml"
    attack.write_text(
        "data:\n  init_args:\n    attack:\n      class_path: poisoning.BadNet\n"
        "      init_args: {target_class: class1, rate: 0.2, seed: 0}\n"
    )
    configs = [str(base), str(attack)]
    assert configured_attack(configs, []) == ("corner_patch", str(attack))
    assert configured_attack(configs, ["--data.attack=poisoning.Blended"]) == ("Blended", "--data.attack")
    run_config = tmp_path / "run-7" / "config.yaml"
    run_config.parent.mkdir()
    run_config.write_text(attack.read_text())
    assert configured_attack([str(base), str(run_config)], []) == ("run-7/config", str(run_config))

    datamodule = load_datamodule(configs, [])
    heading = preview_heading(datamodule, *configured_attack(configs, []))
    assert heading.startswith(f"Attack as configured: corner_patch from {attack} (poisoning.BadNet, target 'class1'")
    plan = datamodule.build_plan()
    keys = [record.key for record in plan.records()[:3]]
    rows = preview_rows(datamodule, keys, plan)
    texts = {key: raw["txt"].decode() for key, raw in load_raw_samples(datamodule.index("train"), keys).items()}
    for key, row in zip(keys, rows):
        assert row["title"].startswith(key)
        assert row["labels"] == [f"original: {texts[key]}", f"poisoned: {plan.poisoned[key].caption}"]
    out = tmp_path / "grid.png"
    assert preview(datamodule, out, 3, overwrite=False, name="corner_patch", source=str(attack)) == 3
    assert Image.open(out).width >= 480
