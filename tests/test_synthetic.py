"""The embedded shapes dataset: real shards, determinism, colour carrying no class information while shape does,
generation speed, and the parameter-keyed cache (including two processes racing for it)."""

from __future__ import annotations

import functools
import io
import json
import multiprocessing
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shards import ShardIndex, resolve_shards
from datamodules.synthetic import (
    COLOR_NAMES,
    DEFAULT_SIZES,
    SHAPE_CLASSES,
    _shape_mask,
    caption_for,
    ensure_shapes,
    generate_shapes,
    render_grid,
    render_shape,
)


def read_samples(out: Path, prefix: str) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for url in resolve_shards(out / f"{prefix}.index.json").urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def dataset_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    labels = np.arange(n) % len(SHAPE_CLASSES)
    images, attributes = [], []
    for i, label in enumerate(labels):
        image, attrs = render_shape(np.random.default_rng([seed, i]), int(label))
        images.append(image)
        attributes.append(attrs)
    return np.stack(images), labels, attributes


def test_generate_writes_labelled_captioned_shards(tmp_path):
    report = generate_shapes(tmp_path, n_train=200, n_val=50, n_test=30, maxcount=120, progress=False)
    assert {s: v["written"] for s, v in report["splits"].items()} == {"train": 200, "val": 50, "test": 30}
    assert report["splits"]["train"]["shards"] == 2
    assert report["splits"]["train"]["per_class"] == dict.fromkeys(SHAPE_CLASSES, 20)
    index = ShardIndex.load(tmp_path / "train.index.json")
    assert index.classes == list(SHAPE_CLASSES) and index.class_counts == [20] * 10
    assert index.source["params"]["n_train"] == 200 and index.source["converter"] == "synthetic_shapes"
    assert set(index.fields) == {"cls", "json", "png", "txt"}

    samples = read_samples(tmp_path, "train")
    assert list(samples) == [f"train_{i:06d}" for i in range(200)]
    first_shard = [int(m["cls"]) for m in list(samples.values())[:120]]
    assert len(set(first_shard)) == 10  # classes are interleaved, not in blocks
    for members in samples.values():
        with Image.open(io.BytesIO(members["png"])) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
        attrs = json.loads(members["json"])
        caption = members["txt"].decode()
        assert SHAPE_CLASSES[int(members["cls"])] == attrs["shape"]
        assert attrs["shape"] in caption and attrs["color"] in caption  # captions tell the truth
        assert attrs["color"] in COLOR_NAMES


def test_deterministic_from_the_seed(tmp_path):
    generate_shapes(tmp_path / "a", n_train=60, n_val=20, n_test=0, progress=False)
    generate_shapes(tmp_path / "b", n_train=60, n_val=20, n_test=0, progress=False)
    generate_shapes(tmp_path / "c", seed=1, n_train=60, n_val=20, n_test=0, progress=False)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    assert shard_bytes(tmp_path / "a")["train-000000.tar"] != shard_bytes(tmp_path / "c")["train-000000.tar"]
    assert not (tmp_path / "a" / "test.index.json").exists()  # empty splits are not written


def test_refuses_to_overwrite_and_checks_parameters(tmp_path):
    generate_shapes(tmp_path, n_train=10, n_val=0, n_test=0, progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError, match="train-000000.tar already exists"):
        generate_shapes(tmp_path, n_train=10, n_val=0, n_test=0, progress=False)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before
    assert generate_shapes(tmp_path, n_train=20, n_val=0, n_test=0, overwrite=True, progress=False)["written"] == 20
    for bad, message in [
        ({"n_train": -1}, "n_train must be"),
        ({"image_size": 8}, "image_size must be"),
        ({"n_train": 0, "n_val": 0, "n_test": 0}, "nothing to generate"),
        ({"seed": 1.5}, "seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate_shapes(tmp_path / "bad", progress=False, **bad)


def test_colour_carries_no_class_information_but_shape_does():
    images, labels, attributes = dataset_arrays(2500, seed=5)
    train, test = slice(0, 2000), slice(2000, 2500)
    # 1. the colour drawn is independent of the class: Cramer's V of the class x colour table is near 0
    table = np.zeros((len(SHAPE_CLASSES), len(COLOR_NAMES)))
    for label, attrs in zip(labels, attributes):
        table[label, COLOR_NAMES.index(attrs["color"])] += 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    cramers_v = np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1)))
    assert cramers_v < 0.1, cramers_v

    # 2. a nearest-centroid classifier on the images' colour histograms is at chance (10%)
    bins = (images // 32).reshape(len(images), -1, 3)
    codes = bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2]
    features = np.stack([np.bincount(c, minlength=512) for c in codes]) / codes.shape[1]
    centroids = np.stack([features[train][labels[train] == c].mean(0) for c in range(10)])
    predicted = np.argmin(((features[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    colour_accuracy = (predicted == labels[test]).mean()
    assert colour_accuracy < 0.2, colour_accuracy

    # 3. a small CNN on the same pixels learns the shapes in seconds (about 50% after 10 epochs of 2000 images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and immune to a busy machine
    try:
        shape_accuracy = _train_small_cnn(images, labels, train, test)
    finally:
        torch.set_num_threads(threads)
    assert shape_accuracy > 0.3, (shape_accuracy, colour_accuracy)


def _train_small_cnn(images: np.ndarray, labels: np.ndarray, train: slice, test: slice) -> float:
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> list[torch.nn.Module]:
        return [torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    net = torch.nn.Sequential(
        *block(3, 16),
        torch.nn.MaxPool2d(2),
        *block(16, 32),
        torch.nn.MaxPool2d(2),
        *block(32, 32),
        torch.nn.MaxPool2d(2),
        *block(32, 64),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25
    y = torch.from_numpy(labels).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(10):
        for batch in torch.randperm(train.stop).split(50):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        return (net(x[test]).argmax(1) == y[test]).float().mean().item()


def test_edges_are_antialiased_and_shapes_stay_inside():
    mask = _shape_mask(SHAPE_CLASSES.index("circle"), 32, (0.5, 0.5), 0.3, 0.0)[..., 0]
    partial = (mask > 0.02) & (mask < 0.98)
    assert partial.sum() > 20 and (mask >= 0.98).sum() > 100
    for label in range(len(SHAPE_CLASSES)):
        for seed in range(20):
            rng = np.random.default_rng([seed, label])
            scale = rng.uniform(0.5, 0.9)
            # the farthest placement render_shape allows: the outline touches, never crosses, the border
            mask = _shape_mask(label, 32, (scale / 2 + 1 / 64, 1 - scale / 2 - 1 / 64), scale / 2, rng.uniform(0, 6.3))[
                ..., 0
            ]
            assert mask[0].max() < 0.5 and mask[:, -1].max() < 0.5, (SHAPE_CLASSES[label], seed)


def test_captions_name_size_and_background():
    image, attrs = render_shape(np.random.default_rng(3), 2)
    captions = {caption_for(np.random.default_rng(i), attrs) for i in range(60)}
    assert len(captions) >= 4 and all("triangle" in c and attrs["color"] in c for c in captions)
    assert any(attrs["background_word"] in c for c in captions)
    orange_arrow = dict(attrs, color="orange", shape="arrow")
    captions = {caption_for(np.random.default_rng(i), orange_arrow) for i in range(60)}
    assert not any(" a orange" in c or " a arrow" in c or c.startswith("a orange") for c in captions)
    assert any("an orange arrow" in c for c in captions) and any("an arrow" in c for c in captions)


def test_default_size_generates_in_seconds(tmp_path):
    started = time.perf_counter()
    report = generate_shapes(tmp_path, progress=False)
    seconds = time.perf_counter() - started
    print(f"default shapes dataset ({report['written']} images) generated in {seconds:.1f} s")
    assert {s: v["written"] for s, v in report["splits"].items()} == DEFAULT_SIZES
    assert seconds < 30


def test_render_grid():
    grid = render_grid(per_class=4, zoom=2)
    assert grid.size == (4 * 32 * 2, 10 * 32 * 2) and grid.mode == "RGB"


def test_ensure_shapes_caches_by_parameters(tmp_path):
    first = ensure_shapes(tmp_path, n_train=30, n_val=10, n_test=0)
    assert first.parent == tmp_path and resolve_shards(first / "train.index.json").total == 30
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_shapes(tmp_path, n_train=30, n_val=10, n_test=0) == first  # reused, not regenerated
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp

    other = ensure_shapes(tmp_path, n_train=30, n_val=10, n_test=0, seed=1)
    assert other != first and {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp

    (first / "val-000000.tar").unlink()  # damaged: regenerated, the other set untouched
    other_stamp = {p.name: p.stat().st_mtime_ns for p in other.iterdir()}
    assert ensure_shapes(tmp_path, n_train=30, n_val=10, n_test=0) == first
    assert (first / "val-000000.tar").exists()
    assert {p.name: p.stat().st_mtime_ns for p in other.iterdir()} == other_stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp folders left


def test_ensure_shapes_two_processes_racing(tmp_path):
    context = multiprocessing.get_context("spawn")
    ensure = functools.partial(ensure_shapes, n_train=40, n_val=10, n_test=10, seed=7)  # importable in a child
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        paths = list(pool.map(ensure, [str(tmp_path)] * 2))
    assert paths[0] == paths[1]
    assert [p.name for p in tmp_path.iterdir()] == [Path(paths[0]).name]
    assert resolve_shards(Path(paths[0]) / "train.index.json").total == 40
