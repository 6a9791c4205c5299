"""A damaged shard set whose every count is known: for the tests that hold the streams' fault counts to it.

16 files listed by an index at 6 samples each (96): 13 good tars, each with at least one sample a stream must skip
(so every worker runs out of samples in its first pass and wraps: every sample of the epoch is read), one tar
truncated in the middle of its 4th sample's image, one empty file, one file that is not a tar.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from datamodules.faults import FAULT_KINDS
from datamodules.shards import ShardIndex, ShardInfo
from tests.conftest import jpeg_bytes, png_bytes, solid_class_image

PER_SHARD = 6
GOOD_SHARDS = 13
CLASSES = ["c0", "c1", "c2", "c3"]
# One skipped sample per good shard, in turn (shard i gets SKIPPED[i % 5]).
SKIPPED = ("corrupt", "zero_byte", "no_image", "one_pixel", "thin")
# Kept samples that are still counted (converted to RGB) or that a modality does not read (label, caption).
KEPT = {0: "gray", 1: "rgba", 2: "palette", 3: "cmyk", 4: "bad_label", 5: "bad_caption"}
TRUNCATED_WHOLE = 3  # whole samples before the cut


def _members(kind: str, label: int, seed: int) -> dict[str, bytes]:
    image = solid_class_image(label, seed)
    members = {"cls": str(label).encode(), "png": png_bytes(image), "txt": f"a photo of c{label} #{seed}".encode()}
    if kind == "corrupt":
        members["png"] = b"\x89PNG but not really an image"
    elif kind == "zero_byte":
        members["png"] = b""
    elif kind == "no_image":
        del members["png"]
    elif kind == "one_pixel":
        members["png"] = png_bytes(np.zeros((1, 1, 3), np.uint8))
    elif kind == "thin":
        members["png"] = png_bytes(np.zeros((3, 2000, 3), np.uint8))  # 2000 x 3
    elif kind in ("gray", "rgba", "palette"):
        members["png"] = png_bytes(image, mode={"gray": "L", "rgba": "RGBA", "palette": "P"}[kind])
    elif kind == "cmyk":
        del members["png"]
        members["jpg"] = jpeg_bytes(image, mode="CMYK")
    elif kind == "bad_label":
        members["cls"] = b"not a number"
    elif kind == "bad_caption":
        members["txt"] = b"caf\xe9 \xff\xfe"  # latin-1 bytes: not UTF-8
    return members


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
    """Members in key order; returns each sample's byte offset where its image member's data starts."""
    image_offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                if ext in ("png", "jpg"):
                    image_offsets.append(tar.offset + 512)
                tar.addfile(info, io.BytesIO(members[ext]))
    return image_offsets


def write_fault_corpus(folder: Path) -> dict[str, dict[str, int]]:
    """Writes the corpus; returns each modality's expected counts for one epoch (``simclr`` / ``clip``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard in range(GOOD_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            kind = SKIPPED[shard % len(SKIPPED)] if i == 0 else (KEPT.get(shard, "good") if i == 1 else "good")
            samples.append((f"s{shard:02d}_{i}", _members(kind, (shard + i) % 4, 100 * shard + i)))
        path = folder / f"train-{shard:06d}.tar"
        _write_tar(path, samples)
        shards.append(ShardInfo(str(path), PER_SHARD))

    truncated = folder / "train-000013.tar"
    offsets = _write_tar(truncated, [(f"t_{i}", _members("good", i % 4, 900 + i)) for i in range(PER_SHARD)])
    truncated.write_bytes(truncated.read_bytes()[: offsets[TRUNCATED_WHOLE] + 100])  # inside sample 4's image
    empty = folder / "train-000014.tar"
    empty.write_bytes(b"")
    not_a_tar = folder / "train-000015.tar"
    not_a_tar.write_bytes(b"key,caption\n1,this is a csv file, not a tar\n" * 20)
    shards += [ShardInfo(str(p), PER_SHARD) for p in (truncated, empty, not_a_tar)]
    ShardIndex(shards=shards, classes=CLASSES).save(folder / "train.index.json")

    skipped = [SKIPPED[s % len(SKIPPED)] for s in range(GOOD_SHARDS)]
    simclr = {kind: 0 for kind in FAULT_KINDS}
    simclr["image_undecodable"] = skipped.count("corrupt") + skipped.count("zero_byte")
    simclr["image_missing"] = skipped.count("no_image")
    simclr["image_too_small"] = skipped.count("one_pixel") + skipped.count("thin")
    simclr["color_converted"] = 4  # gray, rgba, palette, cmyk
    simclr["shard_unreadable"] = 2  # the empty file and the csv
    simclr["shard_truncated"] = 1
    simclr["sample_lost"] = 2 * PER_SHARD + (PER_SHARD - TRUNCATED_WHOLE)  # the 4th sample was cut: lost too
    clip = dict(simclr, caption_missing=1)  # the latin-1 caption; CLIP reads no label
    return {"simclr": simclr, "clip": clip}


def readable_samples(modality: str) -> int:
    """Whole, usable samples in the corpus (what one pass over it delivers)."""
    return GOOD_SHARDS * (PER_SHARD - 1) - (1 if modality == "clip" else 0) + TRUNCATED_WHOLE
