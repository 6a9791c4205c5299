"""Backdoor metrics on stub classifiers whose answers are known exactly, and the control trigger they rely on.

Images are solid colours, one per class, so a stub reads the true class from a corner pixel (the test trigger lies
inside the central 0.15-0.85 window and never covers it). The trigger is the real attack's (``BadNet``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.metrics import BACKDOOR_DEFINITIONS, BackdoorPredictions, KNNMonitor, backdoor_metrics
from poisoning import CTRL, SIG, BadNet, Blended, GeneratedTrigger, NoisyAlignment, WaNet

CLASSES = ["circle", "square", "star", "cross"]
TARGET, PER_CLASS, SIZE = 0, 5, 32
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def attack() -> BadNet:
    # clbd's fixed seeded patch: the pattern-level checks below need one known trigger pattern (the benchmark
    # definition's per-image noise and its control are tested in test_clip_triggers.py)
    badnet = BadNet(target_class="circle", rate=0.1, trigger_size=8, trigger_mode="fixed")
    badnet.validate("image-text", CLASSES, SIZE)
    return badnet


def eval_images() -> list[tuple[str, int, Image.Image]]:
    return [
        (f"k{label}-{i}", label, Image.new("RGB", (SIZE, SIZE), COLOURS[label]))
        for label in range(len(CLASSES))
        for i in range(PER_CLASS)
    ]


def true_class(image: Image.Image) -> int:
    return COLOURS.index(image.getpixel((0, 0)))


def has_real_trigger(image: Image.Image, key: str, badnet: BadNet) -> bool:
    clean = Image.new("RGB", image.size, image.getpixel((0, 0)))
    return np.array_equal(np.asarray(image), np.asarray(badnet.test_trigger(clean, key)))


# The stubs: (image, key) -> predicted class.
def always_target(image, key, badnet):
    return TARGET


def trigger_detector(image, key, badnet):
    return TARGET if has_real_trigger(image, key, badnet) else true_class(image)


def ignores_triggers(image, key, badnet):
    return true_class(image)


def hub_plus_trigger(image, key, badnet):
    """Calls every class-1 image the target (a hub, trigger or not); class-2 images only with the real trigger."""
    label = true_class(image)
    if label == 1 or (label == 2 and has_real_trigger(image, key, badnet)):
        return TARGET
    return label


def predictions(stub) -> tuple[torch.Tensor, ...]:
    badnet = attack()
    labels, clean, triggered, control = [], [], [], []
    for key, label, image in eval_images():
        labels.append(label)
        clean.append(stub(image, key, badnet))
        triggered.append(stub(badnet.test_trigger(image, key), key, badnet))
        control.append(stub(badnet.control_trigger(image, key), key, badnet))
    return tuple(torch.tensor(v) for v in (labels, clean, triggered, control))


def values(result: dict) -> dict[str, float]:
    names = ("asr", "control_asr", "attributable_asr", "clean_to_target", "flip_rate", "target_accuracy")
    return {name: result[name]["value"] for name in names}


N_OTHERS = PER_CLASS * (len(CLASSES) - 1)


@pytest.mark.parametrize(
    "stub, expected, triggered_histogram, control_histogram",
    [
        (
            always_target,
            dict(asr=1, control_asr=1, attributable_asr=0, clean_to_target=1, flip_rate=0, target_accuracy=1),
            [20, 0, 0, 0],
            [20, 0, 0, 0],
        ),
        (
            trigger_detector,
            dict(asr=1, control_asr=0, attributable_asr=1, clean_to_target=0, flip_rate=1, target_accuracy=1),
            [20, 0, 0, 0],
            [5, 5, 5, 5],
        ),
        (
            ignores_triggers,
            dict(asr=0, control_asr=0, attributable_asr=0, clean_to_target=0, flip_rate=0, target_accuracy=1),
            [5, 5, 5, 5],
            [5, 5, 5, 5],
        ),
        (
            hub_plus_trigger,
            dict(
                asr=10 / 15,
                control_asr=5 / 15,
                attributable_asr=5 / 15,
                clean_to_target=5 / 15,
                flip_rate=5 / 15,
                target_accuracy=1,
            ),
            [15, 0, 0, 5],
            [10, 0, 5, 5],
        ),
    ],
)
def test_every_metric_on_stub_classifiers(stub, expected, triggered_histogram, control_histogram):
    labels, clean, triggered, control = predictions(stub)
    result = backdoor_metrics(labels, clean, triggered, control, TARGET, len(CLASSES))
    assert values(result) == pytest.approx(expected)
    for name in ("asr", "control_asr", "clean_to_target", "flip_rate"):
        assert result[name]["images"] == N_OTHERS
    assert result["target_accuracy"]["images"] == PER_CLASS
    assert result["histograms"]["clean"] == torch.bincount(clean, minlength=4).tolist()
    on_target = torch.bincount(clean[labels == TARGET], minlength=4).tolist()
    assert (
        result["histograms"]["clean_target_class"] == on_target
        and on_target[TARGET] == PER_CLASS * values(result)["target_accuracy"]
    )
    assert result["histograms"]["triggered"] == triggered_histogram
    assert result["histograms"]["control"] == control_histogram
    assert result["definitions"] == BACKDOOR_DEFINITIONS and "attributable_asr" in result["definitions"]

    # The streaming form (zero-shot) gives the same, batch by batch.
    streamed = BackdoorPredictions(TARGET, len(CLASSES))
    for chunk in torch.arange(labels.numel()).split(7):
        streamed.update(labels[chunk], clean[chunk], triggered[chunk], control[chunk])
    assert streamed.compute() == result


def test_knn_monitor_reports_the_same_metrics_from_its_predictions():
    # One-hot features per predicted class: the kNN bank of one image per class predicts exactly those classes.
    labels, clean, triggered, control = predictions(hub_plus_trigger)
    eye = torch.eye(len(CLASSES))
    knn = KNNMonitor(num_classes=len(CLASSES), k=1, target=TARGET)
    knn.update_bank(eye, torch.arange(len(CLASSES)))
    knn.update_query(eye[clean], labels, eye[triggered], eye[control])
    result = knn.compute()
    assert result["backdoor"] == backdoor_metrics(labels, clean, triggered, control, TARGET, len(CLASSES))
    assert result["asr"].item() == pytest.approx(10 / 15)


def test_metrics_refuse_images_of_the_target_class_only():
    only_target = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="data.test_shards.*non-target"):
        backdoor_metrics(only_target, only_target, only_target, only_target, TARGET, 4)
    with pytest.raises(ValueError, match="target 7"):
        backdoor_metrics(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]), None, 7, 4)


# ---- the control trigger ---------------------------------------------------------------------------------------
def textured() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB")


def changed(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a, dtype=int) != np.asarray(b, dtype=int)).any(axis=2)


@pytest.mark.parametrize("make", [lambda: attack(), lambda: _na()])
def test_patch_control_has_the_trigger_box_and_blending_but_another_pattern(make):
    atk = make()
    image = textured()
    for key in ("a", "b", "c"):
        real, control = atk.test_trigger(image, key), atk.control_trigger(image, key)
        x0, y0, x1, y1 = atk.test_trigger_box(image.size, key)
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert not changed(image, control)[~inside].any()  # nothing outside the trigger's box
        assert changed(real, control)[inside].mean() > 0.5  # another pattern in it
        # same blending: control = alpha * control_patch + (1 - alpha) * image, inside the box
        patch = np.asarray(atk.control_pattern().patch(x1 - x0), dtype=float)
        expected = atk.trigger_alpha * patch + (1 - atk.trigger_alpha) * np.asarray(image, dtype=float)[y0:y1, x0:x1]
        assert np.abs(np.asarray(control, dtype=float)[y0:y1, x0:x1] - expected).max() <= 1.0


def _na() -> NoisyAlignment:
    na = NoisyAlignment(target_class=0, rate=0.1, reference_pool_size=5, trigger_alpha=0.8)
    na.validate("image", CLASSES, SIZE)
    return na


@pytest.mark.parametrize(
    "atk",
    [
        Blended(target_class="circle", rate=0.1, trigger_mode="fixed"),
        WaNet(target_class="circle", rate=0.1, trigger_mode="fixed"),
        SIG(target_class="circle", rate=0.1, trigger_mode="fixed"),
        CTRL(target_class=0, rate=0.1),
    ],
    ids=["blended", "wanet", "sig", "ctrl"],
)
def test_global_controls_are_the_same_kind_with_another_pattern(atk):
    atk.validate(atk.modality, CLASSES, SIZE)
    image = textured()
    real, control = atk.test_trigger(image, "k"), atk.control_trigger(image, "k")
    strength = lambda out: np.abs(np.asarray(out, dtype=float) - np.asarray(image, dtype=float)).mean()  # noqa: E731
    assert strength(control) > 0 and changed(real, control).mean() > 0.3
    # of the same kind: a change of comparable size (within a factor 1.5)
    assert 1 / 1.5 < strength(control) / strength(real) < 1.5


def test_ctrl_control_uses_other_frequencies_of_the_same_band():
    ctrl = CTRL(target_class=0, rate=0.1)
    assert ctrl.control_frequencies() == [(31, 15), (15, 31)]
    assert not set(ctrl.control_frequencies()) & set(ctrl.frequencies)


def test_a_control_equal_to_the_trigger_is_refused():
    badnet = attack()
    with pytest.raises(ValueError, match="data.control_trigger"):
        badnet.set_control_trigger(GeneratedTrigger("noise", seed=0))
    badnet.set_control_trigger(GeneratedTrigger("patch", seed=5))
    assert badnet.control_pattern() == GeneratedTrigger("patch", seed=5)
