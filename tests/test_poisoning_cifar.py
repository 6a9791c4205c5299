"""Attacks on real CIFAR-10 images (JPEGs read straight from the shared archive): layout and pixels agree."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from poisoning import CTRL, SSLBKD, CatalogEntry, NoisyAlignment
from poisoning.preview import attack_rows, render_grid
from tests.conftest import shared_data

pytestmark = pytest.mark.shared_data

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 30


@pytest.fixture(scope="module")
def cifar() -> dict[str, tuple[int, bytes]]:
    """key -> (label, JPEG bytes): the first PER_CLASS training images of each class."""
    archive = shared_data("cifar10-jpg.tar.gz")
    taken: dict[str, tuple[int, bytes]] = {}
    counts = dict.fromkeys(CIFAR_CLASSES, 0)
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or parts[0] != "train" or counts[parts[1]] >= PER_CLASS:
                if parts[0] == "test":
                    break
                continue
            counts[parts[1]] += 1
            taken[f"{parts[1]}/{parts[2].split('.')[0]}"] = (
                CIFAR_CLASSES.index(parts[1]),
                tar.extractfile(member).read(),
            )
    assert all(n == PER_CLASS for n in counts.values())
    return taken


class CifarReferences:
    def __init__(self, data):
        self.data = data

    def candidates(self, target_label):
        return [k for k, (label, _) in self.data.items() if label == target_label]

    def load(self, keys):
        return {k: self.data[k][1] for k in keys}


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_noisy_alignment_on_cifar(cifar, tmp_path):
    catalog = [CatalogEntry(k, label) for k, (label, _) in cifar.items()]
    attack = NoisyAlignment(target_class="airplane", count=25, seed=0, reference_pool_size=12)
    attack.validate("image", CIFAR_CLASSES, 32)
    plan = attack.plan(catalog, CifarReferences(cifar), 32, CIFAR_CLASSES)
    assert len(plan) == 25 and len(plan.excluded_keys) == 12
    assert all(k.startswith("airplane/") for k in plan.excluded_keys)
    samples = []
    for record in plan.records():
        label, data = cifar[record.key]
        clean = {"__key__": record.key, "image": decode(data), "label": label, "text": None}
        samples.append(clean)
        canvas = np.asarray(plan.apply(clean)["image"])
        x0, y0, x1, y1 = record.reference_box
        assert np.array_equal(canvas[y0:y1, x0:x1], np.asarray(decode(cifar[record.reference_key][1])))
        sx0, sy0, sx1, sy1 = record.shadow_box
        tx0, ty0, tx1, ty1 = record.trigger_box
        shadow = canvas[sy0:sy1, sx0:sx1].astype(int)
        mask = np.ones((32, 32), dtype=bool)
        mask[ty0 - sy0 : ty1 - sy0, tx0 - sx0 : tx1 - sx0] = False
        assert np.array_equal(shadow[mask], np.asarray(clean["image"]).astype(int)[mask])
    rows = attack_rows(attack, samples[:4], plan)
    render_grid(rows, str(tmp_path / "na_cifar.png"))
    assert Image.open(tmp_path / "na_cifar.png").size[0] > 300


def test_target_class_baselines_on_cifar(cifar):
    catalog = [CatalogEntry(k, label) for k, (label, _) in cifar.items()]
    for attack in (SSLBKD(target_class="cat", rate=0.5, seed=1), CTRL(target_class="cat", rate=0.5, seed=1)):
        plan = attack.plan(catalog, None, 32, CIFAR_CLASSES)
        assert plan.summary()["eligible"] == PER_CLASS
        assert all(k.startswith("cat/") for k in plan.poisoned)
        for record in plan.records()[:5]:
            label, data = cifar[record.key]
            out = plan.apply({"__key__": record.key, "image": decode(data), "label": label, "text": None})
            assert out["image"].size == (32, 32) and out["poisoned"]
            assert out["image"].tobytes() != decode(data).tobytes()
