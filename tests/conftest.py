"""Shared fixtures: real shards written with real images, faults included on demand."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.shards import ShardSink
from tests.slurm.fixtures import slurm_cluster  # noqa: F401  (the local SLURM cluster, for slurm-marked tests)

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the main checkout, for git worktrees), or $CLBD_SHARED_DATA.
SHARED_DATA_FOLDERS = [Path(os.environ["CLBD_SHARED_DATA"])] if os.environ.get("CLBD_SHARED_DATA") else []
SHARED_DATA_FOLDERS += [REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data"]

warnings.filterwarnings("ignore", message=".*set_vital.*")

# One intra-op thread per test process, and in the processes tests start (DDP ranks, the CLI, scripts): pytest-xdist
# already runs one process per core, and tests add loader workers and ranks of their own. With torch's default of a
# thread per core, OpenMP barriers wait on threads that have no core, and slow runs stretched many-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in datasets generate into one cache per test session, never into the user's home."""
    monkeypatch.setenv("CLBD_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "clbd-cache"))


def shared_data(name: str) -> Path:
    """A file of ../shared/data; the test skips, saying where it looked, when it is absent."""
    for folder in SHARED_DATA_FOLDERS:
        if (folder / name).is_file():
            return folder / name
    pytest.skip(f"{name} not found in {', '.join(map(str, SHARED_DATA_FOLDERS))} (set CLBD_SHARED_DATA)")


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def solid_class_image(label: int, index: int, size: int = 32) -> np.ndarray:
    """A real image whose content depends on class and index (gradients + a class-coloured block)."""
    rng = np.random.default_rng(label * 100003 + index)
    base = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    base[: size // 2, : size // 2] = np.array([(label * 70) % 255, (label * 130) % 255, (label * 40) % 255])
    return base


@pytest.fixture
def make_shards(tmp_path) -> Callable[..., Path]:
    """``make_shards(n=200, per_shard=50, classes=4, captions=False, prefix="train")`` -> the folder."""

    def make(
        n: int = 200,
        per_shard: int = 50,
        classes: int = 4,
        captions: bool = False,
        prefix: str = "train",
        folder: Path | None = None,
        size: int = 32,
    ) -> Path:
        out = folder or (tmp_path / f"shards-{prefix}")
        names = [f"class{c}" for c in range(classes)]
        with ShardSink(out, prefix, maxcount=per_shard, classes=names) as sink:
            for i in range(n):
                label = i % classes
                members: dict = {"png": png_bytes(solid_class_image(label, i, size)), "cls": label}
                if captions:
                    members["txt"] = f"a photo of a {names[label]} number {i}"
                sink.write(f"{prefix}{i:05d}", members)
        return out

    return make


def append_raw_members(tar_path: Path, members: dict[str, bytes]) -> None:
    """Append members to an existing shard (to plant faults the writer would refuse to make)."""
    with tarfile.open(tar_path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def truncate(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
