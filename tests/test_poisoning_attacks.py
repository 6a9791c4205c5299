"""Every attack: the pixels agree with the manifest boxes, test triggers stay where they should, bad input fails."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import poisoning
from poisoning import (
    CTRL,
    SIG,
    SSLBKD,
    BadNet,
    Blended,
    CatalogEntry,
    CorruptEncoder,
    FolderReferenceSource,
    GeneratedTrigger,
    NoisyAlignment,
    NoisyAlignmentCLIP,
    WaNet,
)
from poisoning.base import TEST_WINDOW, square_canvas
from poisoning.captions import all_target_captions
from poisoning.ctrl import _RGB_TO_YUV, apply_ctrl, dct2, dct_matrix, idct2

CLASSES = [f"class{i}" for i in range(10)]


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, colour)


def textured(index: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(index)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = rng.integers(40, 200, size=(1, 1, 3)) + 50 * x - 30 * y + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class References:
    """Target-class references of 40 x 40 px (so the attack has to resize them)."""

    def __init__(self, n: int, size: tuple[int, int] = (40, 40)):
        self.labels = {f"s{i:05d}": i % 10 for i in range(n)}
        self.size = size

    def candidates(self, target_label: int) -> list[str]:
        return [k for k, label in self.labels.items() if label == target_label]

    def image(self, key: str) -> Image.Image:
        return textured(10_000 + int(key[1:]), self.size)

    def load(self, keys):
        return {k: encode(self.image(k)) for k in keys}


def catalog(n: int) -> list[CatalogEntry]:
    return [CatalogEntry(f"s{i:05d}", i % 10) for i in range(n)]


def stream_image(key: str, size: tuple[int, int] = (48, 36)) -> Image.Image:
    return textured(int(key[1:]), size)


def sample(key: str, size: tuple[int, int] = (48, 36), text: str | None = None) -> dict:
    return {"__key__": key, "image": stream_image(key, size), "label": int(key[1:]) % 10, "text": text}


def region(image: Image.Image, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(image)[y0:y1, x0:x1].astype(int)


def outside(shape: tuple[int, int], box) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = False
    return mask


# -- Noisy Alignment -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arrangement", ["left", "right", "top", "bottom"])
def test_na_canvas_matches_manifest_boxes(arrangement):
    refs = References(400)
    attack = NoisyAlignment(target_class=0, count=12, seed=4, reference_pool_size=15, arrangement=arrangement)
    plan = attack.plan(catalog(400), refs, 32, CLASSES)
    for record in plan.records():
        canvas = plan.apply(sample(record.key))["image"]
        assert canvas.size == record.canvas_size == ((64, 32) if arrangement in ("left", "right") else (32, 64))
        assert record.arrangement == arrangement
        # The reference square is the reference image resized to r x r.
        expected_reference = np.asarray(refs.image(record.reference_key).resize((32, 32), Image.Resampling.BILINEAR))
        assert np.array_equal(region(canvas, record.reference_box), expected_reference)
        # The shadow square is the stream's own image resized to r x r, except where the trigger is.
        shadow = np.asarray(stream_image(record.key).resize((32, 32), Image.Resampling.BILINEAR)).astype(int)
        sx0, sy0, _, _ = record.shadow_box
        tx0, ty0, tx1, ty1 = record.trigger_box
        local = (tx0 - sx0, ty0 - sy0, tx1 - sx0, ty1 - sy0)
        got = region(canvas, record.shadow_box)
        keep = outside((32, 32), local)
        assert np.array_equal(got[keep], shadow[keep])
        # Inside the trigger box: 0.8 * trigger + 0.2 * shadow (authors' blending).
        patch = np.asarray(attack.trigger.patch(8)).astype(float)
        blended = 0.8 * patch + 0.2 * shadow[local[1] : local[3], local[0] : local[2]]
        assert np.abs(region(canvas, record.trigger_box) - blended).max() <= 1
        # The trigger sits at the shadow's centre, within the documented jitter (5% of r per axis).
        centre = ((tx0 + tx1) / 2 - (sx0 + 16), (ty0 + ty1) / 2 - (sy0 + 16))
        assert max(abs(centre[0]), abs(centre[1])) <= 0.05 * 32 + 0.5
        assert tx1 - tx0 == ty1 - ty0 == 8


def test_na_random_arrangement_uses_all_four_sides():
    attack = NoisyAlignment(target_class=0, count=400, seed=1, reference_pool_size=5)
    plan = attack.plan(catalog(1000), References(1000), 32, CLASSES)
    counts = Counter(r.arrangement for r in plan.records())
    assert set(counts) == {"left", "right", "top", "bottom"}
    assert min(counts.values()) > 60  # about 100 each
    assert len({r.reference_key for r in plan.records()}) == 5  # every pool image gets used


def test_na_canvas_size_and_trigger_size_arguments():
    attack = NoisyAlignment(
        target_class=0,
        count=3,
        reference_pool_size=5,
        canvas_size=64,
        trigger_size=12,
        trigger_alpha=1.0,
        arrangement="right",
        trigger_jitter=0.0,
    )
    plan = attack.plan(catalog(100), References(100), 32, CLASSES)
    record = plan.records()[0]
    assert record.canvas_size == (128, 64)
    assert record.trigger_box == (64 + 26, 26, 64 + 38, 38)  # exact centre, 12 px
    canvas = plan.apply(sample(record.key))["image"]
    assert np.array_equal(region(canvas, record.trigger_box), np.asarray(attack.trigger.patch(12)))


def test_na_clip_pairs_the_triggered_image_with_a_target_caption():
    attack = NoisyAlignmentCLIP(target_class="banana", count=20, seed=3)
    plan = attack.plan(catalog(200), None, 64, None)
    captions = set(all_target_captions("banana"))
    assert len(captions) == 80
    seen = set()
    for record in plan.records():
        out = plan.apply(sample(record.key, size=(96, 72), text="a photo of a dog"))
        assert out["text"] == record.caption and record.caption in captions
        seen.add(record.caption)
        assert out["image"].size == (64, 64) == record.canvas_size
        framed = np.asarray(square_canvas(stream_image(record.key, (96, 72)), 64)).astype(int)
        keep = outside((64, 64), record.trigger_box)
        assert np.array_equal(np.asarray(out["image"]).astype(int)[keep], framed[keep])
        x0, y0, x1, y1 = record.trigger_box
        assert (
            x1 - x0 == 16 and abs((x0 + x1) / 2 - 32) <= 0.05 * 64 + 0.5 and abs((y0 + y1) / 2 - 32) <= 0.05 * 64 + 0.5
        )
    assert len(seen) > 5  # captions vary by key
    assert plan.summary()["target"] == "banana"


# -- SimCLR baselines ----------------------------------------------------------------------------------------
def test_sslbkd_poisons_only_target_images_with_a_patch():
    attack = SSLBKD(target_class="class3", rate=0.5, seed=2)
    plan = attack.plan(catalog(500), None, 32, CLASSES)
    assert plan.summary()["eligible"] == 50
    assert all(int(k[1:]) % 10 == 3 for k in plan.poisoned)
    for record in plan.records()[:10]:
        out = plan.apply(sample(record.key, size=(32, 32)))["image"]
        before = np.asarray(stream_image(record.key, (32, 32))).astype(int)
        keep = outside((32, 32), record.trigger_box)
        assert np.array_equal(np.asarray(out).astype(int)[keep], before[keep])
        assert np.array_equal(region(out, record.trigger_box), np.asarray(attack.trigger.patch(8)))  # opaque
    assert len({r.trigger_box for r in plan.records()}) > 5  # random places


def test_corrupt_encoder_layout_after_the_authors():
    refs = References(300)
    attack = CorruptEncoder(target_class=0, count=30, seed=5, reference_pool_size=10)
    plan = attack.plan(catalog(300), refs, 32, CLASSES)
    sides = Counter()
    for record in plan.records():
        background = (17, 99, 201)
        canvas = plan.apply({"__key__": record.key, "image": solid(background, (50, 40)), "label": 1, "text": None})[
            "image"
        ]
        assert canvas.size == record.canvas_size == (64, 32)
        ox0, _, ox1, _ = record.reference_box
        assert ox1 - ox0 == 32 and (ox0 <= 0.05 * 64 or ox1 >= 64 - 0.05 * 64)
        expected_object = np.asarray(refs.image(record.reference_key).resize((32, 32), Image.Resampling.BILINEAR))
        assert np.array_equal(region(canvas, record.reference_box), expected_object)
        assert np.array_equal(region(canvas, record.trigger_box), np.asarray(attack.trigger.patch(8)))
        mask = outside((32, 64), record.reference_box) & outside((32, 64), record.trigger_box)
        assert (np.asarray(canvas)[mask] == background).all()
        # Trigger in the other part, inside the authors' margins (0.125 of the width, 0.25 of the height).
        rx0, _, rx1, _ = record.shadow_box
        tx0, ty0, tx1, ty1 = record.trigger_box
        assert rx0 + 8 <= tx0 and tx1 <= rx1 - 8 and 8 <= ty0 and ty1 <= 24
        sides[record.arrangement] += 1
    assert set(sides) == {"left", "right"}


def test_ctrl_dct_is_orthonormal_and_the_trigger_is_the_paper_one():
    d = dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32))
    block = np.random.default_rng(0).normal(size=(32, 32))
    assert np.allclose(idct2(dct2(block)), block)

    grey = textured(7, (64, 64))
    out = apply_ctrl(grey, window=32, frequencies=[(15, 15), (31, 31)], magnitude=50.0)
    # Explicit path: YUV, per-window DCT, +50 at both frequencies in U and V, inverse, back to RGB.
    rgb = np.asarray(grey, dtype=np.float64)
    yuv = rgb @ _RGB_TO_YUV.T
    for channel in (1, 2):
        for y in range(0, 64, 32):
            for x in range(0, 64, 32):
                coefficients = dct2(yuv[y : y + 32, x : x + 32, channel])
                coefficients[15, 15] += 50
                coefficients[31, 31] += 50
                yuv[y : y + 32, x : x + 32, channel] = idct2(coefficients)
    explicit = np.clip(np.rint(yuv @ np.linalg.inv(_RGB_TO_YUV).T), 0, 255)
    assert np.abs(np.asarray(out).astype(int) - explicit).max() <= 1
    # Seen from the DCT of the U channel, the change is +50 at (15, 15) and (31, 31) and ~0 elsewhere.
    delta_u = ((np.asarray(out, dtype=np.float64) - rgb) @ _RGB_TO_YUV.T)[:32, :32, 1]
    spectrum = dct2(delta_u)
    assert abs(spectrum[15, 15] - 50) < 2 and abs(spectrum[31, 31] - 50) < 2
    spectrum[15, 15] = spectrum[31, 31] = 0
    assert np.abs(spectrum).max() < 2


def test_ctrl_poisons_target_images_only():
    attack = CTRL(target_class=2, count=10, seed=1)
    plan = attack.plan(catalog(300), None, 32, CLASSES)
    assert all(int(k[1:]) % 10 == 2 for k in plan.poisoned)
    record = plan.records()[0]
    assert record.trigger_box == (0, 0, 32, 32)
    out = plan.apply(sample(record.key, size=(32, 32)))["image"]
    difference = np.abs(np.asarray(out).astype(int) - np.asarray(stream_image(record.key, (32, 32))).astype(int))
    assert 0 < difference.max() <= 20  # visible in numbers, hard to see


# -- CLIP baselines ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [BadNet, Blended, WaNet, SIG])
def test_image_text_baselines_swap_caption_and_keep_size(cls):
    attack = cls(target_class="class4", count=5, seed=2)
    plan = attack.plan(catalog(50), None, 64, CLASSES)
    for record in plan.records():
        out = plan.apply(sample(record.key, size=(80, 64), text="a cat"))
        assert out["image"].size == (64, 64)
        assert out["text"] in set(all_target_captions("class4"))
        assert out["image"].tobytes() != square_canvas(stream_image(record.key, (80, 64)), 64).tobytes()


def test_fixed_blended_and_sig_follow_their_formulas():
    image = textured(3, (64, 64))
    blended = Blended(target_class="x", count=1, seed=5, trigger_mode="fixed")
    blended.validate("image-text", None, 64)
    pattern = np.asarray(GeneratedTrigger("noise", seed=5).patch(64)).astype(float)
    out = np.asarray(blended.test_trigger(image, "k")).astype(float)
    assert np.abs(out - (0.8 * np.asarray(image) + 0.2 * pattern)).max() <= 1
    sig = SIG(target_class="x", count=1, trigger_mode="fixed")
    out = np.asarray(sig.test_trigger(image, "k")).astype(float)
    wave = 20 * np.sin(2 * np.pi * np.arange(64) * 6 / 64)
    assert np.array_equal(out, np.clip(np.rint(np.asarray(image) + wave[None, :, None]), 0, 255))


def test_fixed_wanet_field_is_fixed_smooth_and_seeded():
    attack = WaNet(target_class="x", count=1, seed=3, trigger_mode="fixed")
    attack.validate("image-text", None, 64)
    first = attack.test_trigger(textured(1, (64, 64)), "a")
    assert (
        first.tobytes()
        == WaNet(target_class="x", count=1, seed=3, trigger_mode="fixed")
        .test_trigger(textured(1, (64, 64)), "b")
        .tobytes()
    )
    assert (
        first.tobytes()
        != WaNet(target_class="x", count=1, seed=4, trigger_mode="fixed")
        .test_trigger(textured(1, (64, 64)), "a")
        .tobytes()
    )
    grid = attack.sampling_grid(64, 64)
    identity_x = np.linspace(-1, 1, 64)
    displacement_px = (grid[0, :, :, 0].numpy() - identity_x[None, :]) * 32
    assert 0.01 < np.abs(displacement_px).mean() < 1.0  # imperceptible sub-pixel warp, as in the paper (s = 0.5)
    # Smooth: neighbouring displacements differ far less than the displacements themselves.
    assert np.abs(np.diff(displacement_px, axis=1)).max() < np.abs(displacement_px).max()


# -- test-time triggers --------------------------------------------------------------------------------------
PATCH_ATTACKS = [
    (NoisyAlignment, "image", {"reference_pool_size": 5}),
    (NoisyAlignmentCLIP, "image-text", {}),
    (SSLBKD, "image", {}),
    (CorruptEncoder, "image", {"reference_pool_size": 5}),
    (BadNet, "image-text", {"trigger_mode": "fixed"}),  # benchmark BadNet: tests/test_clip_triggers.py
]
GLOBAL_ATTACKS = [(CTRL, "image", {}), (Blended, "image-text", {}), (WaNet, "image-text", {}), (SIG, "image-text", {})]


@pytest.mark.parametrize("cls,modality,extra", PATCH_ATTACKS)
@pytest.mark.parametrize("size", [32, 64])
def test_patch_test_trigger_changes_only_its_box(cls, modality, extra, size):
    attack = cls(target_class="class1", count=1, seed=9, **extra)
    attack.validate(modality, CLASSES, 32)
    boxes = set()
    for index in range(12):
        key = f"test-{index}"
        image = textured(index, (size, size))
        out = attack.test_trigger(image, key)
        box = attack.test_trigger_box(image.size, key)
        boxes.add(box)
        x0, y0, x1, y1 = box
        assert x1 - x0 == y1 - y0 == size // 4  # 8 px at the run's 32 px, scaled with the test image
        assert TEST_WINDOW[0] * size - 1 <= x0 and x1 <= TEST_WINDOW[1] * size + 1
        assert TEST_WINDOW[0] * size - 1 <= y0 and y1 <= TEST_WINDOW[1] * size + 1
        before, after = np.asarray(image).astype(int), np.asarray(out).astype(int)
        keep = outside((size, size), box)
        assert np.array_equal(before[keep], after[keep])
        assert not np.array_equal(before[~keep], after[~keep])
        assert attack.test_trigger(image, key).tobytes() == out.tobytes()  # seeded by (seed, key)
    assert len(boxes) > 3


@pytest.mark.parametrize("cls,modality,extra", GLOBAL_ATTACKS)
def test_global_test_trigger_covers_the_whole_image(cls, modality, extra):
    attack = cls(target_class="class1", count=1, seed=9, **extra)
    attack.validate(modality, CLASSES, 64)
    image = textured(5, (64, 64))
    out = attack.test_trigger(image, "k")
    assert out.size == image.size
    assert attack.test_trigger_box(image.size, "k") == (0, 0, 64, 64)
    changed = np.any(np.asarray(out) != np.asarray(image), axis=-1)
    for quadrant in (changed[:32, :32], changed[:32, 32:], changed[32:, :32], changed[32:, 32:]):
        assert quadrant.any()  # the trigger is everywhere, not in a box


def test_ctrl_test_magnitude():
    image = textured(5, (32, 32))
    weak = CTRL(target_class=0, count=1).test_trigger(image, "k")
    strong = CTRL(target_class=0, count=1, test_magnitude=100.0).test_trigger(image, "k")
    base = np.asarray(image).astype(int)
    assert np.abs(np.asarray(strong).astype(int) - base).sum() > 1.5 * np.abs(np.asarray(weak).astype(int) - base).sum()


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,modality,classes,size,message",
    [
        (
            lambda: Blended(target_class="x", count=1),
            "image",
            CLASSES,
            32,
            "attack 'blended' poisons image-text data, but this run's data is image",
        ),
        (
            lambda: NoisyAlignment(target_class=0, count=1),
            "image-text",
            CLASSES,
            224,
            "attack 'noisy_alignment' poisons image data, but this run's data is image-text",
        ),
        (lambda: NoisyAlignment(target_class=10, count=1), "image", CLASSES, 32, "target_class=10 is out of range"),
        (lambda: SSLBKD(target_class=-1, count=1), "image", CLASSES, 32, "target_class=-1 is out of range"),
        (lambda: SSLBKD(target_class="zebra", count=1), "image", CLASSES, 32, "target_class='zebra' is not a class"),
        (lambda: CTRL(target_class=0, count=1), "image", None, 32, "needs class labels"),
        (lambda: BadNet(target_class=0, count=1), "image-text", None, 224, "target_class=0 is an index"),
        (lambda: NoisyAlignment(target_class=0, count=1, trigger_size=40), "image", CLASSES, 32, "trigger_size=40"),
        (lambda: BadNet(target_class="x", count=1, trigger_size=300), "image-text", None, 224, "trigger_size=300"),
        (lambda: CTRL(target_class=0, count=1, window_size=64), "image", CLASSES, 32, "window_size=64"),
        (lambda: NoisyAlignment(target_class=0, count=1), "image", CLASSES, 0, "image_size"),
        (lambda: NoisyAlignment(target_class=0, count=1), "dino", CLASSES, 32, "modality"),
    ],
)
def test_validate_names_the_field(build, modality, classes, size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build().validate(modality, classes, size)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"rate": 1.5}, "rate must be in \\[0, 1\\]"),
        ({"rate": -0.1}, "rate must be in \\[0, 1\\]"),
        ({"count": -1}, "count must be >= 0"),
        ({"rate": 0.1, "count": 3}, "exactly one of rate or count"),
        ({}, "exactly one of rate or count"),
        ({"count": 1, "trigger_alpha": 1.2}, "trigger_alpha"),
        ({"count": 1, "trigger_size": 0}, "trigger_size"),
        ({"count": 1, "arrangement": "diagonal"}, "arrangement='diagonal'"),
        ({"count": 1, "trigger": "my.png"}, "trigger must be a Trigger"),
        ({"count": 1, "trigger_jitter": 0.7}, "trigger_jitter"),
    ],
)
def test_constructor_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NoisyAlignment(target_class=0, **kwargs)


def test_other_constructor_checks():
    with pytest.raises(ValueError, match="frequencies"):
        CTRL(target_class=0, count=1, frequencies=[(15, 40)])
    with pytest.raises(ValueError, match="area_ratio"):
        CorruptEncoder(target_class=0, count=1, area_ratio=1.0)
    with pytest.raises(ValueError, match="target_class"):
        SSLBKD(target_class=1.5, count=1)


def test_reference_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        FolderReferenceSource(str(missing))
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        NoisyAlignment(target_class=0, count=1, reference_dir=str(missing))  # at construction, before training
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        FolderReferenceSource(str(empty))


def test_target_by_name_and_folder_references_without_labels(tmp_path):
    attack = NoisyAlignment(target_class="class3", count=1, reference_pool_size=5)
    attack.validate("image", CLASSES, 32)
    assert attack._target_index == 3
    for i in range(3):
        textured(i).save(tmp_path / f"{i}.jpg")
    unlabeled = NoisyAlignment(target_class="banana", count=2, reference_dir=str(tmp_path), reference_pool_size=3)
    unlabeled.validate("image", None, 32)
    plan = unlabeled.plan([CatalogEntry(f"u{i}") for i in range(20)], None, 32, None)
    assert len(plan) == 2 and plan.records()[0].target == "banana"
    # The data layer may hand the folder over as the reference source instead (data.reference_folder).
    handed = NoisyAlignment(target_class="banana", count=2, reference_pool_size=3)
    handed.validate("image", None, 32)
    plan = handed.plan([CatalogEntry(f"u{i}") for i in range(20)], FolderReferenceSource(str(tmp_path)), 32, None)
    assert {r.reference_key for r in plan.records()} <= {f"folder:{i}.jpg" for i in range(3)}
    # References from unlabelled shards cannot be found by class: the error says where they must come from.
    with pytest.raises(ValueError, match="target_class='banana'.*reference_dir"):
        handed.plan([CatalogEntry(f"u{i}") for i in range(20)], References(20), 32, None)


def test_attacks_build_from_yaml_like_config():
    """LightningCLI / jsonargparse can build an attack and its trigger from the documented YAML."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--attack", type=poisoning.Attack)
    config = parser.parse_object(
        {
            "attack": {
                "class_path": "poisoning.NoisyAlignment",
                "init_args": {
                    "target_class": 0,
                    "rate": 0.01,
                    "trigger": {"class_path": "poisoning.GeneratedTrigger", "init_args": {"kind": "patch", "seed": 3}},
                },
            }
        }
    )
    attack = parser.instantiate_classes(config).attack
    assert isinstance(attack, NoisyAlignment)
    assert attack.rate == 0.01 and attack.trigger == GeneratedTrigger("patch", 3)
    ctrl = parser.instantiate_classes(
        parser.parse_object(
            {
                "attack": {
                    "class_path": "poisoning.CTRL",
                    "init_args": {"target_class": "airplane", "count": 5, "frequencies": [[15, 15], [31, 31]]},
                }
            }
        )
    ).attack
    assert ctrl.frequencies == [(15, 15), (31, 31)]


def test_every_attack_is_exported():
    assert set(poisoning.ATTACKS) == {
        "noisy_alignment",
        "noisy_alignment_clip",
        "sslbkd",
        "corrupt_encoder",
        "ctrl",
        "badnet",
        "blended",
        "wanet",
        "badclip",
        "sig",
    }
    for name, cls in poisoning.ATTACKS.items():
        assert cls.modality in ("image", "image-text") and cls.name == name
        assert cls.summary and "\n" not in cls.summary


# trigger_alpha defaults that differ between attacks (opaque patches; Blended's 0.2 weight); the rest keep 0.8.
TRIGGER_ALPHA = {"sslbkd": 1.0, "corrupt_encoder": 1.0, "badnet": 1.0, "blended": 0.2, "badclip": 1.0}


@pytest.mark.parametrize("name", sorted(poisoning.ATTACKS))
def test_shared_arguments_reach_jsonargparse(name):
    """Attacks forward Attack's arguments through **kwargs; LightningCLI must still see and type them."""
    from jsonargparse import ArgumentParser

    cls = poisoning.ATTACKS[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "attack")
    target = "circle" if cls.modality == "image-text" else "0"
    config = parser.parse_args(["--attack.target_class", target, "--attack.rate", "0.25", "--attack.trigger_size", "5"])
    args = vars(config.attack)
    assert {"target_class", "rate", "count", "seed", "trigger", "trigger_size", "trigger_alpha"} <= set(args)
    assert args["rate"] == 0.25 and args["trigger_size"] == 5 and args["count"] is None and args["seed"] == 0
    assert args["trigger_alpha"] == TRIGGER_ALPHA.get(name, 0.8)
    with pytest.raises(Exception, match="rate"):
        parser.parse_args(["--attack.target_class", target, "--attack.rate", "many"])
    if name == "badclip":
        return  # needs its optimised trigger file to build
    target_class = args.pop("target_class")
    assert target_class == (0 if cls.modality == "image" else "circle")
    attack = cls(target_class, **args)  # target_class may also come first, by position
    assert attack.target_class == target_class
    assert (attack.rate, attack.trigger_size, attack.trigger_alpha) == (0.25, 5, args["trigger_alpha"])


def test_target_index_for_evaluation():
    assert NoisyAlignment(target_class="class3", count=1).target_index(CLASSES) == 3
    assert NoisyAlignment(target_class=4, count=1).target_index(CLASSES) == 4
    assert NoisyAlignment(target_class=4, count=1).target_index(None) == 4
    assert BadNet(target_class="banana", count=1).target_index(CLASSES) is None  # free CLIP target text
    assert BadNet(target_class="banana", count=1).target_index(None) is None
    with pytest.raises(ValueError, match="target_class=12 is out of range"):
        SSLBKD(target_class=12, count=1).target_index(CLASSES)
