"""Converters on real tars and real images made here: faults, colour conversion, determinism, overwrite safety,
CIFAR-10 (torchvision pickles, folders, the real archive), COCO captions, CSV, img2dataset output, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clbd import data as data_cli
from datamodules.converters.cifar10 import convert_cifar10
from datamodules.converters.coco import convert_coco_captions
from datamodules.converters.csv_captions import convert_csv
from datamodules.converters.image_folder import CIFAR10_CLASSES, convert_image_folder
from datamodules.converters.images import ImageLimits, SkipSample, prepare_image
from datamodules.converters.img2dataset import index_img2dataset
from datamodules.shards import ShardIndex, resolve_shards
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Real images of every kind


def noise(seed: int, size=(24, 20), channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return rng.integers(0, 256, shape, dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written byte by byte (PIL cannot write 16-bit RGB, nor lie about its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def rgb16_png(values: np.ndarray) -> bytes:
    height, width, _ = values.shape
    big_endian = values.astype(">u2")
    rows = b"".join(b"\x00" + big_endian[y].tobytes() for y in range(height))
    return png_raw(width, height, 16, 2, rows)


def bomb_png(side: int = 100_000) -> bytes:
    """A small file whose header claims side x side pixels."""
    return png_raw(side, side, 8, 2, b"\x00" + b"\x00" * 30)


def gray16_array() -> np.ndarray:
    return (np.arange(24 * 20, dtype=np.uint32).reshape(20, 24) * 137 % 65536).astype(np.uint16)


def rgba_image() -> Image.Image:
    rgba = noise(3, channels=4)
    rgba[:, :12, 3] = 0  # left half fully transparent: must become white
    rgba[:, 12:, 3] = 255
    return Image.fromarray(rgba, mode="RGBA")


FAULTY_FILES = {  # name -> (bytes factory, expected outcome)
    "cat/good1.jpg": (lambda: encode(Image.fromarray(noise(1)), "JPEG", quality=90), "kept"),
    "cat/good2.png": (lambda: encode(Image.fromarray(noise(2)), "PNG"), "kept"),
    "cat/gray.jpg": (lambda: encode(Image.fromarray(noise(4, channels=1), mode="L"), "JPEG"), "color_converted"),
    "cat/rgba.png": (lambda: encode(rgba_image(), "PNG"), "color_converted"),
    "cat/cmyk.jpg": (lambda: encode(Image.fromarray(noise(5, channels=4), mode="CMYK"), "JPEG"), "color_converted"),
    "cat/palette.png": (lambda: encode(Image.fromarray(noise(6)).quantize(16), "PNG"), "color_converted"),
    "cat/gray16.png": (lambda: encode(Image.fromarray(gray16_array()), "PNG"), "color_converted"),
    "cat/rgb16.png": (lambda: rgb16_png(noise(7).astype(np.uint16) * 257), "color_converted"),
    "cat/truncated.jpg": (lambda: encode(Image.fromarray(noise(8)), "JPEG")[:300], "image_undecodable"),
    "cat/corrupt.jpg": (
        lambda: bytes(np.random.default_rng(9).integers(0, 256, 900, dtype=np.uint8)),
        "image_undecodable",
    ),
    "cat/text.png": (lambda: b"this is not an image\n" * 20, "image_undecodable"),
    "cat/tiny.png": (lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image_too_small"),
    "cat/bomb.png": (bomb_png, "image_too_large"),
    "cat/readme.txt": (lambda: b"notes about cats\n", "not_image_file"),
    "cat/.DS_Store": (lambda: b"\x00\x00\x00\x01Bud1", "hidden_file"),
    "dog/good3.jpg": (lambda: encode(Image.fromarray(noise(10)), "JPEG"), "kept"),
    "dog/sub/nested.jpg": (lambda: encode(Image.fromarray(noise(11)), "JPEG"), "kept"),
    "dog/x.y.jpg": (lambda: encode(Image.fromarray(noise(12)), "JPEG"), "kept"),
    "dog/x_y.jpg": (lambda: encode(Image.fromarray(noise(13)), "JPEG"), "kept"),
    "loose.jpg": (lambda: encode(Image.fromarray(noise(14)), "JPEG"), "not_in_class_folder"),
}


def make_faulty_folder(root: Path) -> dict[str, bytes]:
    contents = {}
    for rel, (make, _) in FAULTY_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[rel] = make()
        path.write_bytes(contents[rel])
    (root / "empty_class").mkdir()
    return contents


def make_targz(folder: Path, archive: Path, arcname: str | None = None) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname if arcname is not None else folder.name)
    return archive


def read_shards(out: Path, prefix: str) -> dict[str, dict[str, bytes]]:
    """All samples of a shard set, in stored order: key -> {ext: bytes}."""
    index = json.loads((out / f"{prefix}.index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in index["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        assert len({k for k in samples}) >= shard["count"]
    assert len(samples) == index["total"]
    return samples


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir())
    }


def shard_bytes(out: Path, prefix: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(f"{prefix}-*.tar"))}


# ----------------------------------------------------------------------------------------------------------------
# prepare_image


def test_rgb_jpeg_and_png_keep_their_bytes():
    jpeg = encode(Image.fromarray(noise(1)), "JPEG", quality=70)
    png = encode(Image.fromarray(noise(2)), "PNG")
    assert prepare_image(jpeg) == prepare_image(jpeg) and prepare_image(jpeg).data == jpeg
    assert prepare_image(jpeg).ext == "jpg" and prepare_image(jpeg).converted is None
    assert prepare_image(png).data == png and prepare_image(png).ext == "png"


def test_color_modes_become_rgb_with_right_values():
    rgba = prepare_image(encode(rgba_image(), "PNG"))
    pixels = decode(rgba.data)
    assert rgba.converted == "color_converted" and rgba.ext == "png"
    assert (pixels[:, :12] == 255).all()  # transparent -> white, not black
    assert (pixels[:, 12:] == noise(3, channels=4)[:, 12:, :3]).all()

    gray16 = prepare_image(encode(Image.fromarray(gray16_array()), "PNG"))
    expected = np.rint(gray16_array() / 257.0).astype(np.uint8)  # scaled, not clipped at 255
    pixels = decode(gray16.data)
    assert (pixels[..., 0] == expected).all() and (pixels[..., 1] == expected).all()

    high = noise(7)
    rgb16 = prepare_image(rgb16_png(high.astype(np.uint16) * 257))
    assert rgb16.converted == "color_converted" and (decode(rgb16.data) == high).all()

    palette_image = Image.fromarray(noise(6)).quantize(16)
    palette = prepare_image(encode(palette_image, "PNG"))
    assert (decode(palette.data) == np.asarray(palette_image.convert("RGB"))).all()

    cmyk = prepare_image(encode(Image.fromarray(noise(5, channels=4), mode="CMYK"), "JPEG"))
    assert cmyk.ext == "jpg" and decode(cmyk.data).shape == (20, 24, 3)

    gray = prepare_image(encode(Image.fromarray(noise(4, channels=1), mode="L"), "JPEG"))
    pixels = decode(gray.data).astype(int)
    assert gray.ext == "jpg" and np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 2


def test_other_formats_are_reencoded_and_counted_apart():
    bmp = prepare_image(encode(Image.fromarray(noise(1)), "BMP"))
    assert bmp.ext == "png" and bmp.converted == "format_converted"
    assert (decode(bmp.data) == noise(1)).all()  # lossless source -> lossless PNG


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "image_undecodable"),
        (b"GIF89a garbage", "image_undecodable"),
        (encode(Image.fromarray(noise(8)), "JPEG")[:300], "image_undecodable"),
        (encode(Image.new("RGB", (1, 1)), "PNG"), "image_too_small"),
        (encode(Image.new("RGB", (40, 4)), "PNG"), "image_too_small"),
        (bomb_png(), "image_too_large"),  # beyond PIL's hard limit: refused while reading the header
        (bomb_png(10_000), "image_too_large"),  # 1e8 px: between PIL's warning and error thresholds
        (bomb_png(8_100), "image_too_large"),  # 65.6M px: under PIL's warning, over the stream's 64M limit
    ],
)
def test_bad_images_are_skipped_with_a_reason(data, reason):
    with pytest.raises(SkipSample) as info:
        prepare_image(data)
    assert info.value.reason == reason


def test_limits_are_configurable():
    image = encode(Image.fromarray(noise(1, size=(30, 30))), "PNG")
    assert prepare_image(image, ImageLimits(min_side=30)).data == image
    with pytest.raises(SkipSample, match="image_too_small"):
        prepare_image(image, ImageLimits(min_side=31))
    with pytest.raises(SkipSample, match="image_too_large"):
        prepare_image(image, ImageLimits(max_pixels=899))


# ----------------------------------------------------------------------------------------------------------------
# Image folders: the fault list, folder == archive, determinism, overwrite safety


def expected_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, outcome in FAULTY_FILES.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def test_image_folder_fault_list(tmp_path):
    contents = make_faulty_folder(tmp_path / "src")
    report = convert_image_folder(tmp_path / "src", tmp_path / "out", prefix="train", progress=False)
    split = report["splits"]["train"]
    counts = expected_counts()
    assert split["written"] == counts["kept"] + counts["color_converted"] == 12
    assert split["skipped"] == {
        k: counts[k]
        for k in (
            "image_undecodable",
            "image_too_small",
            "image_too_large",
            "not_image_file",
            "hidden_file",
            "not_in_class_folder",
        )
    }
    assert split["converted"] == {"color_converted": 6, "key_renamed": 1}
    assert split["per_class"] == {"cat": 8, "dog": 4, "empty_class": 0}
    assert report["skipped"] == split["skipped"] and report["written"] == 12

    index = ShardIndex.load(tmp_path / "out" / "train.index.json")
    assert index.classes == ["cat", "dog", "empty_class"] and index.class_counts == [8, 4, 0]
    assert index.source["converter"] == "image_folder" and index.source["options"]["maxcount"] == 10000
    assert set(index.fields) == {"cls", "jpg", "png"}

    samples = read_shards(tmp_path / "out", "train")
    assert set(samples) == {
        "train_cat_good1",
        "train_cat_good2",
        "train_cat_gray",
        "train_cat_rgba",
        "train_cat_cmyk",
        "train_cat_palette",
        "train_cat_gray16",
        "train_cat_rgb16",
        "train_dog_good3",
        "train_dog_sub_nested",
        "train_dog_x_y",
        "train_dog_x_y_1",
    }
    for key, members in samples.items():
        assert int(members["cls"]) == (0 if key.startswith("train_cat") else 1)
        image = members.get("jpg") or members["png"]
        assert decode(image).shape[2] == 3
    assert samples["train_cat_good1"]["jpg"] == contents["cat/good1.jpg"]  # no re-encode, no quality loss
    assert samples["train_cat_good2"]["png"] == contents["cat/good2.png"]
    assert "jpg" in samples["train_cat_cmyk"] and "png" in samples["train_cat_gray16"]
    # the renamed key keeps both files: x.y.jpg sorts first and keeps the plain name
    assert samples["train_dog_x_y"]["jpg"] == contents["dog/x.y.jpg"]
    assert samples["train_dog_x_y_1"]["jpg"] == contents["dog/x_y.jpg"]


def test_archive_gives_the_same_shards_as_the_folder(tmp_path):
    make_faulty_folder(tmp_path / "src")
    make_targz(tmp_path / "src", tmp_path / "src.tar.gz")  # one top-level folder "src/", entered automatically
    with tarfile.open(tmp_path / "src.tar", "w") as tar:  # uncompressed: read by seeking
        tar.add(tmp_path / "src", arcname=".")
    before = {p.name for p in tmp_path.iterdir()}
    reports = [
        convert_image_folder(tmp_path / "src", tmp_path / "a", progress=False),
        convert_image_folder(tmp_path / "src.tar.gz", tmp_path / "b", progress=False),
        convert_image_folder(tmp_path / "src.tar", tmp_path / "c", progress=False),
    ]
    assert {p.name for p in tmp_path.iterdir()} == before | {"a", "b", "c"}  # nothing unpacked beside them
    assert shard_bytes(tmp_path / "a", "train") == shard_bytes(tmp_path / "b", "train")
    assert shard_bytes(tmp_path / "a", "train") == shard_bytes(tmp_path / "c", "train")
    assert reports[0]["splits"]["train"]["skipped"] == reports[1]["splits"]["train"]["skipped"]


def test_determinism_and_shard_size(tmp_path):
    make_faulty_folder(tmp_path / "src")
    first = convert_image_folder(tmp_path / "src", tmp_path / "one", maxcount=5, progress=False)
    second = convert_image_folder(tmp_path / "src", tmp_path / "two", maxcount=5, progress=False)
    assert first["splits"]["train"]["shards"] == 3
    assert {k: v for k, v in second["splits"]["train"].items() if k != "index"} == {
        k: v for k, v in first["splits"]["train"].items() if k != "index"
    }
    assert shard_bytes(tmp_path / "one", "train") == shard_bytes(tmp_path / "two", "train")
    assert [s.count for s in ShardIndex.load(tmp_path / "one" / "train.index.json").shards] == [5, 5, 2]
    a = json.loads((tmp_path / "one" / "train.index.json").read_text())
    b = json.loads((tmp_path / "two" / "train.index.json").read_text())
    a.pop("created"), b.pop("created")
    assert a == b

    # the default order is shuffled (shards mix classes); no shuffle keeps sorted keys
    convert_image_folder(tmp_path / "src", tmp_path / "sorted", shuffle_seed=None, progress=False)
    keys = list(read_shards(tmp_path / "sorted", "train"))
    assert keys == sorted(keys) and list(read_shards(tmp_path / "one", "train")) != keys


def test_existing_output_is_never_overwritten(tmp_path):
    make_faulty_folder(tmp_path / "src")
    convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    before = snapshot(tmp_path / "out")
    time.sleep(0.01)
    with pytest.raises(FileExistsError, match=r"train-000000\.tar already exists.*--overwrite"):
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert snapshot(tmp_path / "out") == before

    # only the index left: still refused
    for tar in (tmp_path / "out").glob("*.tar"):
        tar.unlink()
    with pytest.raises(FileExistsError, match=r"train\.index\.json"):
        convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)

    # another prefix beside it is fine; overwrite=True replaces
    convert_image_folder(tmp_path / "src", tmp_path / "out", prefix="val", progress=False)
    report = convert_image_folder(tmp_path / "src", tmp_path / "out", overwrite=True, progress=False)
    assert report["written"] == 12 and resolve_shards(tmp_path / "out" / "train.index.json").total == 12


def test_linked_class_folders_are_followed(tmp_path):
    make_faulty_folder(tmp_path / "store")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dog").symlink_to(tmp_path / "store" / "dog", target_is_directory=True)
    report = convert_image_folder(tmp_path / "src", tmp_path / "out", progress=False)
    assert report["splits"]["train"]["per_class"] == {"dog": 4}


def test_image_folder_options_and_errors(tmp_path):
    make_faulty_folder(tmp_path / "src")
    report = convert_image_folder(
        tmp_path / "src", tmp_path / "out", prefix="val", classes=["dog", "cat", "empty_class", "bird"], progress=False
    )
    assert report["splits"]["val"]["per_class"] == {"dog": 4, "cat": 8, "empty_class": 0, "bird": 0}
    with pytest.raises(ValueError, match=r"class folder\(s\) \['empty_class'\] are not in the given classes"):
        convert_image_folder(tmp_path / "src", tmp_path / "o2", classes=["cat", "dog"], progress=False)
    with pytest.raises(FileNotFoundError, match="source does not exist"):
        convert_image_folder(tmp_path / "nope", tmp_path / "o3", progress=False)
    with pytest.raises(ValueError, match="prefix"):
        convert_image_folder(tmp_path / "src", tmp_path / "o4", prefix="a.b", progress=False)
    (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a tar archive"):
        convert_image_folder(tmp_path / "plain.txt", tmp_path / "o5", progress=False)
    with pytest.raises(FileNotFoundError, match="has no folder 'missing'"):
        convert_image_folder(tmp_path / "src", tmp_path / "o6", subdir="missing", progress=False)
    sub = convert_image_folder(tmp_path / "src", tmp_path / "o7", subdir="dog", progress=False)
    assert sub["splits"]["train"]["per_class"] == {"sub": 1}
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # errors come before any output


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10: torchvision's python batches, folders, the real archive


def write_cifar_python(root: Path, per_batch: int = 7, n_test: int = 9) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py in the exact format: protocol-2 pickles of dicts with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {
            b"batch_label": (
                b"testing batch 1 of 1" if name == "test_batch" else f"training batch {name[-1]} of 5".encode()
            ),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{name}_{j}.png".encode() for j in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        split = "test" if name == "test_batch" else "train"
        splits[split][0].append(data)
        splits[split][1].extend(labels)
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "readme.html").write_text("<html></html>")
    return {s: (np.concatenate(d), lab) for s, (d, lab) in splits.items()}


@pytest.mark.parametrize("as_archive", [False, True])
def test_cifar10_python_format(tmp_path, as_archive):
    arrays = write_cifar_python(tmp_path / "raw")
    src = tmp_path / "raw" / "cifar-10-batches-py"
    if as_archive:
        src = make_targz(src, tmp_path / "cifar-10-python.tar.gz")
    report = convert_cifar10(src, tmp_path / "out", progress=False)
    assert report["splits"]["train"]["written"] == 35 and report["splits"]["test"]["written"] == 9
    assert report["skipped"] == {} and report["converted"] == {}
    for split, (data, labels) in arrays.items():
        samples = read_shards(tmp_path / "out", split)
        assert list(samples) == [f"{split}_{i:06d}" for i in range(len(labels))]  # batch order kept
        for i, members in enumerate(samples.values()):
            assert int(members["cls"]) == labels[i]
            expected = data[i].reshape(3, 32, 32).transpose(1, 2, 0)  # R plane, G plane, B plane
            assert (decode(members["png"]) == expected).all()  # lossless
        index = ShardIndex.load(tmp_path / "out" / f"{split}.index.json")
        assert index.classes == list(CIFAR10_CLASSES)
        assert index.class_counts == [labels.count(c) for c in range(10)]
        assert index.source["converter"] == "cifar10" and "python" in index.source["layout"]


def test_cifar10_python_archive_equals_folder_and_refuses_code(tmp_path):
    write_cifar_python(tmp_path / "raw")
    src = tmp_path / "raw" / "cifar-10-batches-py"
    convert_cifar10(src, tmp_path / "a", progress=False)
    convert_cifar10(make_targz(src, tmp_path / "c.tar.gz"), tmp_path / "b", progress=False)
    assert shard_bytes(tmp_path / "a", "train") == shard_bytes(tmp_path / "b", "train")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load"):
        convert_cifar10(src, tmp_path / "c", progress=False)
    assert not (tmp_path / "pwned").exists()
    (src / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        convert_cifar10(src, tmp_path / "d", progress=False)


def make_class_folders(root: Path, classes, per_class: int = 2) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                (folder / f"{j:04d}.jpg").write_bytes(encode(Image.fromarray(noise(100 * c + j)), "JPEG"))


def test_cifar10_folder_layout_uses_official_order(tmp_path):
    make_class_folders(tmp_path / "cifar" / "cifar10", CIFAR10_CLASSES)  # nested one folder deeper
    archive = make_targz(tmp_path / "cifar", tmp_path / "cifar.tar.gz")
    report = convert_cifar10(archive, tmp_path / "out", progress=False)
    assert report["splits"]["train"]["per_class"] == dict.fromkeys(CIFAR10_CLASSES, 2)
    samples = read_shards(tmp_path / "out", "test")
    for key, members in samples.items():
        class_name = key.split("_")[1]
        assert int(members["cls"]) == CIFAR10_CLASSES.index(class_name)  # not the sorted index


def test_cifar10_folder_layout_other_names_sorted(tmp_path):
    make_class_folders(tmp_path / "src", ["zebra", "ant", "moose"], per_class=1)
    report = convert_cifar10(tmp_path / "src", tmp_path / "out", progress=False)
    assert ShardIndex.load(tmp_path / "out" / "train.index.json").classes == ["ant", "moose", "zebra"]
    assert report["written"] == 6
    for members in read_shards(tmp_path / "out", "train").values():
        assert members["jpg"][:2] == b"\xff\xd8"


@pytest.mark.shared_data
def test_cifar10_real_archive(tmp_path):
    archive = shared_data("cifar10-jpg.tar.gz")
    started = time.perf_counter()
    report = convert_cifar10(archive, tmp_path / "out", progress=False)
    seconds = time.perf_counter() - started
    print(f"converted {report['written']} CIFAR-10 images in {seconds:.1f} s")
    assert report["splits"]["train"]["written"] == 50_000 and report["splits"]["test"]["written"] == 10_000
    assert report["splits"]["train"]["per_class"] == dict.fromkeys(CIFAR10_CLASSES, 5000)
    assert report["splits"]["test"]["per_class"] == dict.fromkeys(CIFAR10_CLASSES, 1000)
    assert report["skipped"] == {} and report["converted"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # read from the archive, nothing unpacked
    for split, n in (("train", 50_000), ("test", 10_000)):
        samples = read_shards(tmp_path / "out", split)
        assert len(samples) == n
        per_class = np.zeros(10, dtype=int)
        for key, members in samples.items():
            _, class_name, _ = key.split("_")
            label = int(members["cls"])
            assert label == CIFAR10_CLASSES.index(class_name), key  # label matches its folder name
            per_class[label] += 1
        assert per_class.tolist() == [n // 10] * 10
        some = list(samples.values())[:: n // 50]
        assert all(decode(m["jpg"]).shape == (32, 32, 3) for m in some)
        first_shard = [int(m["cls"]) for m in list(samples.values())[:2000]]
        assert len(set(first_shard)) == 10  # shuffled: every shard mixes the classes
    with tarfile.open(archive) as tar:  # original JPEG bytes, byte for byte
        original = tar.extractfile("train/horse/0001.jpg").read()
    assert read_shards(tmp_path / "out", "train")["train_horse_0001"]["jpg"] == original


# ----------------------------------------------------------------------------------------------------------------
# COCO captions


def write_coco(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.png", "nocap.jpg", "sub/c.jpg", "broken.jpg"]):
        data = encode(Image.fromarray(noise(i)), "PNG" if name.endswith("png") else "JPEG")
        (images / name).write_bytes(data[:200] if name == "broken.jpg" else data)
    annotations = {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "b.png"},
            {"id": 3, "file_name": "nocap.jpg"},
            {"id": 4, "file_name": "missing.jpg"},
            {"id": 5, "file_name": "sub/c.jpg"},
            {"id": 6, "file_name": "broken.jpg"},
        ],
        "annotations": [
            {"image_id": 1, "id": 10, "caption": "  A cat on a mat.\n"},
            {"image_id": 2, "id": 11, "caption": "A dog, running."},
            {"image_id": 1, "id": 12, "caption": "Another cat"},
            {"image_id": 2, "id": 13, "caption": "   "},
            {"image_id": 99, "id": 14, "caption": "nobody's image"},
            {"image_id": 4, "id": 15, "caption": "gone"},
            {"image_id": 5, "id": 16, "caption": "Ünïcödé caption"},
            {"image_id": 6, "id": 17, "caption": "truncated file"},
        ],
    }
    path = root / "captions.json"
    path.write_text(json.dumps(annotations))
    return images, path


def test_coco_captions_first_and_all(tmp_path):
    images, annotations = write_coco(tmp_path)
    first = convert_coco_captions(images, annotations, tmp_path / "out", prefix="val", progress=False)
    split = first["splits"]["val"]
    assert split["written"] == 3
    assert split["skipped"] == {
        "caption_missing": 1,
        "file_missing": 1,
        "annotation_orphan": 1,
        "caption_empty": 1,
        "image_undecodable": 1,
    }
    samples = read_shards(tmp_path / "out", "val")
    assert list(samples) == ["val_a", "val_b", "val_sub_c"]  # sorted by file name
    assert samples["val_a"]["txt"].decode() == "A cat on a mat."
    assert json.loads(samples["val_a"]["json"]) == {
        "image_id": 1,
        "file_name": "a.jpg",
        "captions": ["A cat on a mat.", "Another cat"],
    }
    assert samples["val_sub_c"]["txt"].decode() == "Ünïcödé caption"
    assert samples["val_a"]["jpg"] == (images / "a.jpg").read_bytes()
    index = ShardIndex.load(tmp_path / "out" / "val.index.json")
    assert index.classes is None and set(index.fields) == {"jpg", "json", "png", "txt"}
    assert index.source["options"]["captions"] == "first"

    every = convert_coco_captions(
        images, annotations, tmp_path / "out", prefix="val_all", captions="all", progress=False
    )
    samples = read_shards(tmp_path / "out", "val_all")
    assert every["written"] == 4
    assert list(samples) == ["val_all_a_0", "val_all_a_1", "val_all_b_0", "val_all_sub_c_0"]
    assert samples["val_all_a_1"]["txt"].decode() == "Another cat"
    assert json.loads(samples["val_all_a_1"]["json"])["caption_index"] == 1


def test_coco_keys_stay_unique(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.jpg", "a.png"):  # same stem: "all" mode would give both the key val_a_0
        (tmp_path / "img" / name).write_bytes(
            encode(Image.fromarray(noise(len(name))), name[-3:].replace("jpg", "JPEG"))
        )
    annotations = tmp_path / "c.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "a.png"}],
                "annotations": [
                    {"image_id": 1, "caption": "x"},
                    {"image_id": 1, "caption": "y"},
                    {"image_id": 2, "caption": "z"},
                ],
            }
        )
    )
    report = convert_coco_captions(
        tmp_path / "img", annotations, tmp_path / "out", prefix="val", captions="all", progress=False
    )
    samples = read_shards(tmp_path / "out", "val")
    assert list(samples) == ["val_a_0", "val_a_1", "val_a_0_1"] and report["converted"] == {"key_renamed": 1}
    assert samples["val_a_0_1"]["txt"] == b"z" and "png" in samples["val_a_0_1"]


def test_coco_bad_annotations(tmp_path):
    images, annotations = write_coco(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"annotations file {broken} is not valid JSON"):
        convert_coco_captions(images, broken, tmp_path / "out", progress=False)
    broken.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks 'id' or 'file_name'"):
        convert_coco_captions(images, broken, tmp_path / "out", progress=False)
    broken.write_text(json.dumps({"categories": []}))
    with pytest.raises(ValueError, match="must hold lists 'images' and 'annotations'"):
        convert_coco_captions(images, broken, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="annotations file does not exist"):
        convert_coco_captions(images, tmp_path / "none.json", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="images folder does not exist"):
        convert_coco_captions(tmp_path / "noimages", annotations, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="captions must be"):
        convert_coco_captions(images, annotations, tmp_path / "out", captions="some", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.shared_data
def test_coco_mini(tmp_path):
    archive = shared_data("coco-mini.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "coco-mini"
    expected = {"train": 80, "val": 79}
    for split, n in expected.items():
        annotations = root / "annotations" / f"captions_{split}2017.json"
        report = convert_coco_captions(
            root / f"{split}2017", annotations, tmp_path / "out", prefix=split, progress=False
        )
        assert report["written"] == n and report["skipped"] == {}
        samples = read_shards(tmp_path / "out", split)
        raw = json.loads(annotations.read_text())
        first_caption = {}
        for ann in raw["annotations"]:
            first_caption.setdefault(ann["image_id"], ann["caption"].strip())
        for members in samples.values():
            meta = json.loads(members["json"])
            assert members["txt"].decode() == first_caption[meta["image_id"]]
            assert len(meta["captions"]) == 5
            assert decode(members["jpg"]).ndim == 3
        every = convert_coco_captions(
            root / f"{split}2017", annotations, tmp_path / "all", prefix=split, captions="all", progress=False
        )
        assert every["written"] == 5 * n
    # val2017 also holds 80 images no caption names (one of them grayscale): they are not samples
    assert len(list((root / "val2017").iterdir())) == 159 and report["converted"] == {}


# ----------------------------------------------------------------------------------------------------------------
# CSV


def test_csv_rows(tmp_path):
    (tmp_path / "imgs" / "deep").mkdir(parents=True)
    (tmp_path / "imgs" / "one.jpg").write_bytes(encode(Image.fromarray(noise(1)), "JPEG"))
    (tmp_path / "imgs" / "deep" / "two.png").write_bytes(encode(Image.fromarray(noise(2), mode="RGB"), "PNG"))
    absolute = tmp_path / "elsewhere.jpg"
    absolute.write_bytes(encode(Image.fromarray(noise(3, channels=1), mode="L"), "JPEG"))
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"nope")
    csv_path = tmp_path / "meta" / "captions.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "filepath,caption,source\n"
        'one.jpg,"A red, round thing",web\n'
        "missing.jpg,lost,web\n"
        "deep/two.png,,web\n"
        f"{absolute},an absolute path,disk\n"
        "deep/two.png,the same image again,web\n"
        "bad.jpg,broken bytes,web\n"
    )
    report = convert_csv(csv_path, tmp_path / "out", prefix="train", root=tmp_path / "imgs", progress=False)
    split = report["splits"]["train"]
    assert split["written"] == 3
    assert split["skipped"] == {"file_missing": 1, "caption_missing": 1, "image_undecodable": 1}
    assert split["converted"] == {"color_converted": 1}
    samples = read_shards(tmp_path / "out", "train")
    assert list(samples) == ["train_000000", "train_000003", "train_000004"]  # keys by row
    assert samples["train_000000"]["txt"].decode() == "A red, round thing"
    assert json.loads(samples["train_000000"]["json"]) == {"filepath": "one.jpg", "source": "web"}
    assert samples["train_000004"]["png"] == (tmp_path / "imgs" / "deep" / "two.png").read_bytes()

    # without root, paths start from the CSV's folder: every relative row is missing there
    report = convert_csv(csv_path, tmp_path / "out2", prefix="train", progress=False)
    assert report["written"] == 1 and report["skipped"] == {"file_missing": 5}

    tsv = tmp_path / "imgs" / "list.tsv"
    tsv.write_text("filepath\tcaption\none.jpg\ta caption, with a comma\n")
    report = convert_csv(tsv, tmp_path / "out3", prefix="tsv", progress=False)
    assert read_shards(tmp_path / "out3", "tsv")["tsv_000000"]["txt"].decode() == "a caption, with a comma"


def test_csv_errors(tmp_path):
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("filepath,caption\nmissing.jpg,a caption\n")
    with pytest.raises(ValueError, match=r"no sample to write for 'train' \(skipped: \{'file_missing': 1\}\)"):
        convert_csv(nothing, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\na.jpg,x\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) filepath, caption"):
        convert_csv(bad, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="CSV file does not exist"):
        convert_csv(tmp_path / "none.csv", tmp_path / "out", progress=False)
    bad.write_text("filepath,caption\n")
    with pytest.raises(FileNotFoundError, match="root folder does not exist"):
        convert_csv(bad, tmp_path / "out", root=tmp_path / "nowhere", progress=False)
    bad.write_bytes(b"filepath,caption\n\xff\xfe,\x80\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        convert_csv(bad, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------------------------
# img2dataset output


def write_img2dataset_shard(
    folder: Path,
    shard: int,
    n: int,
    *,
    drop_caption: int | None = None,
    successes: int | None = None,
    stats: bool = True,
) -> None:
    with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            sample = {
                "__key__": key,
                "jpg": encode(Image.fromarray(noise(shard * 100 + i)), "JPEG"),
                "json": json.dumps({"url": f"http://example.com/{key}.jpg", "key": key, "status": "success"}),
            }
            if i != drop_caption:
                sample["txt"] = f"caption of {key}"
            sink.write(sample)
    if stats:
        (folder / f"{shard:05d}_stats.json").write_text(
            json.dumps(
                {
                    "count": n + 1,
                    "successes": n if successes is None else successes,
                    "failed_to_download": 1,
                    "failed_to_resize": 0,
                    "duration": 1.5,
                    "status_dict": {"success": n, "timeout": 1},
                },
                indent=4,
            )
        )
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1" + b"\x00" * 16 + b"PAR1")  # present, never read


def test_index_img2dataset(tmp_path):
    src = tmp_path / "cc"
    src.mkdir()
    write_img2dataset_shard(src, 0, 3)
    write_img2dataset_shard(src, 1, 3, drop_caption=1, successes=4)  # the stats file disagrees with the tar
    write_img2dataset_shard(src, 2, 4)
    whole = (src / "00002.tar").read_bytes()
    (src / "00002.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-copy
    write_img2dataset_shard(src, 3, 2, stats=False)
    write_img2dataset_shard(src, 4, 2)
    with tarfile.open(src / "00004.tar") as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512
    (src / "00004.tar").write_bytes((src / "00004.tar").read_bytes()[:end])  # cut exactly after a member
    (src / "00005.tar").write_bytes(bytes(range(256)) * 8)  # not a tar at all
    before = {p.name: p.read_bytes() for p in src.glob("*.tar")}

    report = index_img2dataset(src, progress=False)
    split = report["splits"]["train"]
    assert split["written"] == 8 and split["shards"] == 3
    assert split["stats_mismatches"] == [{"shard": "00001.tar", "stats_successes": 4, "scanned": 3}]
    assert [u["shard"] for u in split["unreadable_shards"]] == ["00002.tar", "00004.tar", "00005.tar"]
    assert split["skipped"] == {"caption_missing": 1, "shard_truncated": 2, "shard_unreadable": 1}
    assert {p.name: p.read_bytes() for p in src.glob("*.tar")} == before  # shards untouched

    index = resolve_shards(src)  # the folder now has exactly one index
    assert [Path(u).name for u in index.urls] == ["00000.tar", "00001.tar", "00003.tar"]
    assert [s.count for s in index.shards] == [3, 3, 2] and index.total == 8
    assert set(index.fields) == {"jpg", "json", "txt"}
    assert index.source["converter"] == "img2dataset"

    with pytest.raises(FileExistsError, match=r"train\.index\.json already exists"):
        index_img2dataset(src, progress=False)
    again = index_img2dataset(src, prefix="cc3m", progress=False)
    assert again["written"] == 8 and (src / "cc3m.index.json").exists()
    fast = index_img2dataset(src, prefix="fast", trust_stats=True, progress=False)
    counts = [s.count for s in ShardIndex.load(src / "fast.index.json").shards]
    assert counts == [3, 4, 4, 2, 2]  # the stats' word; the cut shards are not even opened
    assert fast["splits"]["fast"]["shards"] == 5
    with pytest.raises(FileNotFoundError, match="holds no img2dataset shards"):
        index_img2dataset(tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clbd.data", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_main_converts_and_refuses_overwrite(tmp_path, capsys):
    write_cifar_python(tmp_path / "raw")
    src = str(tmp_path / "raw" / "cifar-10-batches-py")
    out = str(tmp_path / "out")
    assert (
        data_cli.main(
            [
                "cifar10",
                "--src",
                src,
                "--out",
                out,
                "--quiet",
                "--maxcount",
                "20",
                "--report",
                str(tmp_path / "report.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "cifar10: 44 samples" in printed and "train" in printed and "test" in printed
    assert json.loads((tmp_path / "report.json").read_text())["splits"]["train"]["shards"] == 2
    before = snapshot(tmp_path / "out")

    assert data_cli.main(["cifar10", "--src", src, "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and out in err and "Traceback" not in err
    assert snapshot(tmp_path / "out") == before
    assert data_cli.main(["cifar10", "--src", src, "--out", out, "--quiet", "--overwrite"]) == 0

    assert data_cli.main(["info", out]) == 0
    printed = capsys.readouterr().out
    assert "train.index.json" in printed and "samples: 35" in printed and "airplane" in printed
    assert data_cli.main(["info", out + "/test.index.json", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["total"] == 9


def test_cli_every_subcommand(tmp_path, capsys):
    make_faulty_folder(tmp_path / "folder")
    assert (
        data_cli.main(
            ["folder", "--src", str(tmp_path / "folder"), "--out", str(tmp_path / "f"), "--prefix", "train", "--quiet"]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "skip:image_undecodable" in table and "color_converted" in table

    images, annotations = write_coco(tmp_path / "coco")
    assert (
        data_cli.main(
            [
                "coco",
                "--images",
                str(images),
                "--annotations",
                str(annotations),
                "--out",
                str(tmp_path / "c"),
                "--prefix",
                "val",
                "--captions",
                "all",
                "--quiet",
            ]
        )
        == 0
    )
    assert "coco_captions: 4 samples" in capsys.readouterr().out

    csv_path = tmp_path / "coco" / "list.csv"
    csv_path.write_text("filepath,caption\na.jpg,a cat\n")
    assert (
        data_cli.main(
            [
                "csv",
                "--csv",
                str(csv_path),
                "--out",
                str(tmp_path / "s"),
                "--prefix",
                "train",
                "--root",
                str(images),
                "--quiet",
            ]
        )
        == 0
    )
    assert "csv: 1 samples" in capsys.readouterr().out

    (tmp_path / "i2d").mkdir()
    write_img2dataset_shard(tmp_path / "i2d", 0, 2, successes=3)
    assert data_cli.main(["img2dataset", "--src", str(tmp_path / "i2d"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "2 samples in the tar, 3 in its stats file" in printed

    assert (
        data_cli.main(
            [
                "synthetic",
                "--out",
                str(tmp_path / "syn"),
                "--n-train",
                "20",
                "--n-val",
                "10",
                "--n-test",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    assert "synthetic_shapes: 30 samples" in capsys.readouterr().out

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert (
        data_cli.main(
            ["coco", "--images", str(images), "--annotations", str(broken), "--out", str(tmp_path / "c2"), "--quiet"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(broken) in err


def test_cli_as_a_module(tmp_path):
    result = run_cli("folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"clbd data folder: error: source does not exist: {tmp_path / 'missing'}"
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

    result = run_cli("--help")
    assert result.returncode == 0 and "cifar10" in result.stdout and "img2dataset" in result.stdout
    result = run_cli("cifar10", "--src", "x")  # usage error from argparse: still exit 2, no traceback
    assert result.returncode == 2 and "--out" in result.stderr and "Traceback" not in result.stderr

    make_class_folders(tmp_path / "src", ["a", "b"], per_class=1)
    result = run_cli("cifar10", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "index:" in result.stdout
    result = run_cli("info", str(tmp_path / "out" / "train-000000.tar"))
    assert result.returncode == 0 and "samples: 2" in result.stdout
