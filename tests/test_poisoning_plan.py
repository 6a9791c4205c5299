"""The poison plan: selection by hash, budgets, determinism across processes/workers/order, manifest, pools."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisoning import (
    SSLBKD,
    CatalogEntry,
    FolderReferenceSource,
    GeneratedTrigger,
    NoisyAlignment,
    NoisyAlignmentCLIP,
    select_keys,
)
from poisoning.keyhash import derive_seed, key_choice, key_uniform
from poisoning.plan import records_from_manifest

CLASSES = [f"class{i}" for i in range(10)]
ROOT = Path(__file__).resolve().parents[1]


# -- a small labelled data set, built the same way in every process -----------------------------------------------
def make_image(index: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(index)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.integers(0, 256, size=(1, 1, 3))
    pixels = (base * (0.5 + 0.5 * x) + 80 * y) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ShardReferences:
    """Stands in for the data layer's reference source: target-class images of the training set, by key."""

    def __init__(self, n: int):
        self.labels = {f"s{i:05d}": i % 10 for i in range(n)}
        self.n = n

    def candidates(self, target_label: int) -> list[str]:
        return [k for k, label in self.labels.items() if label == target_label]

    def load(self, keys):
        return {k: encode(make_image(int(k[1:]))) for k in keys}


def catalog(n: int) -> list[CatalogEntry]:
    return [CatalogEntry(f"s{i:05d}", i % 10) for i in range(n)]


def sample(key: str) -> dict:
    index = int(key[1:])
    return {"__key__": key, "image": make_image(index), "label": index % 10, "text": None}


def na_plan(n: int = 600, **kwargs):
    kwargs.setdefault("count", 40)
    attack = NoisyAlignment(target_class=0, seed=7, reference_pool_size=20, **kwargs)
    return attack.plan(catalog(n), ShardReferences(n), 32, CLASSES)


def fingerprint(n: int = 600) -> str:
    """sha256 over the manifest and every poisoned image's pixels: what must agree across processes."""
    plan = na_plan(n)
    digest = hashlib.sha256()
    for line in plan.manifest_lines():
        digest.update(line.encode())
    for record in plan.records():
        digest.update(plan.apply(sample(record.key))["image"].tobytes())
    return digest.hexdigest()


# -- selection ------------------------------------------------------------------------------------------------
def test_selection_is_a_pure_function_of_seed_and_key():
    keys = [f"k{i}" for i in range(5000)]
    chosen = select_keys(keys, seed=1, rate=0.05)
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    assert select_keys(shuffled, seed=1, rate=0.05) == chosen
    assert select_keys(keys + keys[:100], seed=1, rate=0.05) == chosen  # duplicates do not count twice
    assert select_keys(keys, seed=2, rate=0.05) != chosen
    # Each key decides alone: a key's fate does not depend on which other keys exist.
    assert select_keys(keys[:2500], seed=1, rate=0.05) == [k for k in chosen if k in set(keys[:2500])]
    # The documented rule, spelled out.
    digest = hashlib.blake2b(b"1:k17", digest_size=8).digest()
    assert key_uniform(1, "k17") == int.from_bytes(digest, "big") / 2**64


def test_keyed_choices_and_seeds_follow_their_documented_rules():
    """The bits every poisoned set, manifest, view and resume depends on: spelled out so a refactor cannot move them."""
    options = ["a", "b", "c", "d", "e"]
    for key in ("k0", "k1", "k17", "train_000042"):
        u = int.from_bytes(hashlib.blake2b(f"3:{key}".encode(), digest_size=8, person=b"reference").digest(), "big")
        assert key_choice(3, key, "reference", options) == options[int(u / 2**64 * len(options))]
    picked = {key_choice(3, f"k{i}", "reference", options) for i in range(200)}
    assert picked == set(options)  # every option is reachable
    parts = b"\x1f".join([b"7", b"2", b"train_000042", b"buffer"])
    expected = int.from_bytes(hashlib.blake2b(parts, digest_size=8).digest(), "little") >> 1
    assert derive_seed(7, 2, "train_000042", "buffer") == expected
    assert 0 <= derive_seed("x") < 2**63


def test_rate_gives_about_rate_times_n_and_count_gives_exactly_count():
    keys = [f"k{i}" for i in range(20000)]
    chosen = select_keys(keys, seed=0, rate=0.01)
    expected, sigma = 200, (20000 * 0.01 * 0.99) ** 0.5
    assert abs(len(chosen) - expected) < 4 * sigma
    exact = select_keys(keys, seed=0, count=123)
    assert len(exact) == 123
    # The count rule takes the smallest hashes, so a smaller count is a subset of a larger one.
    assert set(select_keys(keys, seed=0, count=50)) <= set(exact)
    assert select_keys(keys, seed=0, rate=0.0) == []
    assert select_keys(keys, seed=0, rate=1.0) == sorted(keys)
    assert select_keys(keys, seed=0, count=0) == []


def test_count_larger_than_eligible_names_count():
    with pytest.raises(ValueError, match="count=11 but only 10 eligible"):
        select_keys([f"k{i}" for i in range(10)], seed=0, count=11)
    with pytest.raises(ValueError, match="count=61 but only 60 eligible"):
        SSLBKD(target_class=0, count=61).plan(catalog(600), None, 32, CLASSES)


def test_summary_reports_what_happened():
    plan = na_plan(600, count=None, rate=0.1)
    summary = plan.summary()
    assert summary["attack"] == "noisy_alignment"
    assert summary["target"] == "class0" and summary["target_index"] == 0
    assert summary["asked"] == {"rate": 0.1}
    assert summary["catalog"] == 600
    assert summary["pool_size"] == 20
    assert summary["eligible"] == 580  # the 20 pool images left the clean stream
    assert summary["poisoned"] == len(plan) == len(plan.records())
    assert abs(summary["poisoned"] - 58) < 4 * (580 * 0.1 * 0.9) ** 0.5
    counted = na_plan(600, count=37).summary()
    assert counted["asked"] == {"count": 37} and counted["poisoned"] == 37


# -- determinism ----------------------------------------------------------------------------------------------
def test_same_plan_and_bytes_whatever_the_catalog_order():
    n = 600
    forward = na_plan(n)
    entries = catalog(n)
    random.Random(5).shuffle(entries)
    attack = NoisyAlignment(target_class=0, count=40, seed=7, reference_pool_size=20)
    shuffled = attack.plan(entries, ShardReferences(n), 32, CLASSES)
    assert forward.manifest_lines() == shuffled.manifest_lines()
    assert forward.excluded_keys == shuffled.excluded_keys
    for record in forward.records()[:10]:
        assert (
            forward.apply(sample(record.key))["image"].tobytes()
            == shuffled.apply(sample(record.key))["image"].tobytes()
        )


def test_pickled_plan_renders_the_same_bytes():
    plan = na_plan()
    keys = [r.key for r in plan.records()]
    before = {k: plan.apply(sample(k))["image"].tobytes() for k in keys}
    clone = pickle.loads(pickle.dumps(plan))
    assert clone.manifest_lines() == plan.manifest_lines()
    assert {k: clone.apply(sample(k))["image"].tobytes() for k in reversed(keys)} == before
    # The plan stays small: records, arguments and the encoded references it uses; no decoded pixels, no source.
    used = {r.reference_key for r in plan.records()}
    assert set(plan.reference_bytes) == used and plan.references is None
    assert len(pickle.dumps(plan)) < 20_000 + sum(len(plan.reference_bytes[k]) for k in used)


def test_workers_never_reload_embedded_references():
    class OneShot(ShardReferences):
        """A source that can be read at plan time only (as if the shards were gone afterwards)."""

        def __init__(self, n):
            super().__init__(n)
            self.closed = False

        def load(self, keys):
            assert not self.closed, "the plan went back to the reference source"
            return super().load(keys)

    source = OneShot(600)
    plan = NoisyAlignment(target_class=0, count=40, seed=7, reference_pool_size=20).plan(
        catalog(600), source, 32, CLASSES
    )
    source.closed = True
    assert plan.apply(sample(plan.records()[0].key))["poisoned"]
    assert plan.summary()["references_embedded"] is True


def test_large_pools_are_loaded_lazily_with_the_same_bytes(monkeypatch):
    import poisoning.base

    embedded = na_plan()
    monkeypatch.setattr(poisoning.base, "EMBED_REFERENCES_LIMIT", 0)
    lazy = pickle.loads(pickle.dumps(na_plan()))
    assert lazy.reference_bytes == {} and lazy.references is not None
    assert lazy.summary()["references_embedded"] is False
    for record in lazy.records():
        assert (
            lazy.apply(sample(record.key))["image"].tobytes() == embedded.apply(sample(record.key))["image"].tobytes()
        )


def test_other_processes_compute_the_same_plan_and_pixels():
    here = fingerprint()
    script = "import sys; sys.path[:0] = ['tests', '.']; import test_poisoning_plan as t; print(t.fingerprint())"
    # A different string-hash salt than this process: Python's hash() would change the poisoned set.
    env = dict(os.environ, PYTHONHASHSEED=str(12345 if os.environ.get("PYTHONHASHSEED") != "12345" else 1))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


class PoisonedStream(torch.utils.data.IterableDataset):
    """A minimal stream: each DataLoader worker poisons its share of the keys with its copy of the plan."""

    def __init__(self, plan, keys):
        self.plan, self.keys = plan, keys

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shard = self.keys if info is None else self.keys[info.id :: info.num_workers]
        for key in shard:
            out = self.plan.apply(sample(key))
            yield key, out["poisoned"], out["image"].tobytes()


def test_dataloader_workers_render_the_same_bytes():
    plan = na_plan()
    keys = sorted({r.key for r in plan.records()} | {f"s{i:05d}" for i in range(1, 600, 37)})
    expected = {k: (plan.apply(sample(k))["poisoned"], plan.apply(sample(k))["image"].tobytes()) for k in keys}
    loader = torch.utils.data.DataLoader(
        PoisonedStream(plan, keys), batch_size=None, num_workers=2, multiprocessing_context="spawn"
    )
    seen = {key: (bool(poisoned), data) for key, poisoned, data in loader}
    assert seen == expected


# -- apply ------------------------------------------------------------------------------------------------------
def test_apply_marks_clean_samples_and_leaves_them_alone():
    plan = na_plan()
    clean_key = next(
        f"s{i:05d}" for i in range(600) if f"s{i:05d}" not in plan.poisoned and f"s{i:05d}" not in plan.excluded_keys
    )
    original = sample(clean_key)
    out = plan.apply(original)
    assert out["poisoned"] is False
    assert out["image"] is original["image"]
    assert "poisoned" not in original  # the input dict is not modified
    poisoned_key = plan.records()[0].key
    poisoned = plan.apply(sample(poisoned_key))
    assert poisoned["poisoned"] is True and poisoned["image"].size in {(64, 32), (32, 64)}
    assert poisoned["label"] == sample(poisoned_key)["label"] and poisoned["text"] is None


def test_clip_plan_swaps_the_caption():
    attack = NoisyAlignmentCLIP(target_class="banana", count=5, seed=1)
    plan = attack.plan(catalog(100), None, 224, None)
    record = plan.records()[0]
    out = plan.apply({"__key__": record.key, "image": make_image(3, (300, 200)), "label": -1, "text": "a dog on grass"})
    assert out["text"] == record.caption and "banana" in out["text"]
    assert out["image"].size == (224, 224)


# -- manifest ---------------------------------------------------------------------------------------------------
def test_manifest_is_sorted_deterministic_json_lines(tmp_path):
    plan = na_plan()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    plan.write_manifest(first)
    na_plan().write_manifest(second)
    assert first.read_bytes() == second.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert records_from_manifest(first) == rows
    assert [r["key"] for r in rows] == sorted(plan.poisoned)
    row = rows[0]
    assert set(row) == {"key", "attack", "target", "reference_key", "arrangement", "canvas_size", "boxes", "caption"}
    assert set(row["boxes"]) == {"reference", "shadow", "trigger"}
    assert row["attack"] == "noisy_alignment" and row["target"] == "class0" and row["caption"] is None
    assert row["reference_key"] in plan.excluded_keys
    assert row["arrangement"] in {"left", "right", "top", "bottom"}


# -- reference pools ------------------------------------------------------------------------------------------
def test_pool_from_training_shards_is_excluded_and_never_poisoned():
    plan = na_plan(600, count=None, rate=1.0)
    assert len(plan.excluded_keys) == 20
    assert all(k.startswith("s") and int(k[1:]) % 10 == 0 for k in plan.excluded_keys)
    assert not plan.excluded_keys & set(plan.poisoned)
    assert {r.reference_key for r in plan.records()} <= plan.excluded_keys


def test_pool_from_a_folder_excludes_nothing(tmp_path):
    for i in range(6):
        make_image(1000 + i).save(tmp_path / f"ref{i}.png")
    attack = NoisyAlignment(target_class=0, count=30, reference_dir=str(tmp_path), reference_pool_size=None)
    plan = attack.plan(catalog(200), None, 32, None)
    assert plan.excluded_keys == frozenset()
    assert plan.summary()["pool_size"] == 6
    assert {r.reference_key for r in plan.records()} <= set(FolderReferenceSource(str(tmp_path)).candidates(-1))
    record = plan.records()[0]
    reference = Image.open(tmp_path / record.reference_key.removeprefix("folder:")).convert("RGB")
    canvas = np.asarray(plan.apply(sample(record.key))["image"])
    x0, y0, x1, y1 = record.reference_box
    assert np.array_equal(canvas[y0:y1, x0:x1], np.asarray(reference.resize((32, 32), Image.Resampling.BILINEAR)))


def test_pool_too_small_or_empty_names_reference_pool_size(tmp_path):
    with pytest.raises(ValueError, match="reference_pool_size=1200 but only 60"):
        NoisyAlignment(target_class=0, count=5).plan(catalog(600), ShardReferences(600), 32, CLASSES)
    empty = ShardReferences(600)
    empty.labels = {k: 1 for k in empty.labels}
    with pytest.raises(ValueError, match="reference_pool_size: no target-class reference"):
        NoisyAlignment(target_class=0, count=5, reference_pool_size=3).plan(catalog(600), empty, 32, CLASSES)
    with pytest.raises(ValueError, match="reference_pool_size must be >= 1"):
        NoisyAlignment(target_class=0, count=5, reference_pool_size=0)
    with pytest.raises(ValueError, match="reference_dir"):
        NoisyAlignment(target_class=0, count=5, reference_pool_size=3).plan(catalog(600), None, 32, CLASSES)


def test_undecodable_references_are_skipped_and_counted():
    class Broken(ShardReferences):
        def load(self, keys):
            out = super().load(keys)
            return {k: (b"not an image" if int(k[1:]) % 20 == 0 else v) for k, v in out.items()}

    attack = NoisyAlignment(target_class=0, count=10, seed=2, reference_pool_size=25)
    plan = attack.plan(catalog(600), Broken(600), 32, CLASSES)
    assert plan.summary()["pool_size"] == 25
    assert plan.summary()["pool_rejected"] > 0
    assert all(int(k[1:]) % 20 != 0 for k in plan.excluded_keys)
    with pytest.raises(ValueError, match="only 30 of 60 reference images decode"):
        NoisyAlignment(target_class=0, count=10, reference_pool_size=40).plan(catalog(600), Broken(600), 32, CLASSES)


def test_trigger_object_travels_with_the_plan():
    attack = NoisyAlignment(target_class=0, count=5, reference_pool_size=5, trigger=GeneratedTrigger("checkerboard", 9))
    plan = attack.plan(catalog(100), ShardReferences(100), 32, CLASSES)
    assert plan.summary()["trigger"] == {"class": "GeneratedTrigger", "kind": "checkerboard", "seed": 9}
    assert pickle.loads(pickle.dumps(plan)).attack.trigger == GeneratedTrigger("checkerboard", 9)
