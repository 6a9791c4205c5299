"""Triggers: generated patterns are seeded and stable, user images fail early, pasting blends exactly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from poisoning import GeneratedTrigger, ImageTrigger, default_trigger_size, paste_trigger


def gradient(width: int, height: int, offset: int = 0) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    rgb = np.stack([x + 0 * y, y + 0 * x, (x + y + offset) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("kind", ["patch", "checkerboard", "noise"])
def test_generated_trigger_is_seeded_square_rgb(kind):
    first = GeneratedTrigger(kind, seed=3).patch(8)
    again = GeneratedTrigger(kind, seed=3).patch(8)
    other = GeneratedTrigger(kind, seed=4).patch(8)
    assert first.mode == "RGB" and first.size == (8, 8)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    assert GeneratedTrigger(kind, seed=3).patch(50).size == (50, 50)
    # Not a flat colour: a trigger must carry a pattern.
    assert len(np.unique(np.asarray(first).reshape(-1, 3), axis=0)) > 1


def test_generated_kinds_differ():
    patches = {kind: GeneratedTrigger(kind, seed=0).patch(16).tobytes() for kind in ("patch", "checkerboard", "noise")}
    assert len(set(patches.values())) == 3


def test_unknown_kind_names_the_field():
    with pytest.raises(ValueError, match="kind='stripes'"):
        GeneratedTrigger(kind="stripes")


def test_image_trigger_reads_user_file(tmp_path):
    path = tmp_path / "trigger.png"
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 255
    rgba[:5, :5, 3] = 0  # transparent corner goes on black
    Image.fromarray(rgba, "RGBA").save(path)
    trigger = ImageTrigger(str(path))
    patch = trigger.patch(10)
    assert patch.mode == "RGB" and patch.size == (10, 10)
    pixels = np.asarray(patch)
    assert pixels[5, 8, 0] == 255 and pixels[5, 8, 1] == 0
    # Pickled (as in the plan sent to workers) it gives the same pixels, without the file.
    clone = pickle.loads(pickle.dumps(trigger))
    path.unlink()
    assert clone.patch(10).tobytes() == patch.tobytes()


def test_image_trigger_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        ImageTrigger(str(missing))


def test_image_trigger_not_an_image_names_the_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ValueError, match="notes.png"):
        ImageTrigger(str(path))
    with pytest.raises(ValueError, match="not a file"):
        ImageTrigger(str(tmp_path))


def test_default_trigger_sizes_follow_the_authors():
    assert default_trigger_size(32) == 8
    assert default_trigger_size(224) == 50
    assert default_trigger_size(64) == 16
    assert default_trigger_size(96) == round(96 * 50 / 224)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.8, 1.0])
def test_paste_trigger_blends_only_inside_the_box(alpha):
    image = gradient(32, 32)
    patch = GeneratedTrigger("noise", seed=1).patch(8)
    box = (5, 9, 13, 17)
    out = paste_trigger(image, patch, box, alpha)
    before, after = np.asarray(image).astype(int), np.asarray(out).astype(int)
    outside = np.ones((32, 32), dtype=bool)
    outside[9:17, 5:13] = False
    assert np.array_equal(before[outside], after[outside])
    expected = alpha * np.asarray(patch).astype(float) + (1 - alpha) * before[9:17, 5:13]
    assert np.abs(after[9:17, 5:13] - expected).max() <= 1
    if alpha == 1.0:
        assert np.array_equal(after[9:17, 5:13], np.asarray(patch))
    assert image.tobytes() == gradient(32, 32).tobytes()  # the input is not modified


def test_paste_trigger_rejects_bad_boxes_and_alpha():
    image = gradient(16, 16)
    patch = GeneratedTrigger().patch(8)
    with pytest.raises(ValueError, match="does not fit"):
        paste_trigger(image, patch, (10, 10, 18, 18), 0.5)
    with pytest.raises(ValueError, match="trigger_alpha"):
        paste_trigger(image, patch, (0, 0, 8, 8), 1.5)
