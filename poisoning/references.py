"""Reference images of the target class: where they come from and how a pool is drawn from them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from poisoning.keyhash import key_uniform
from poisoning.plan import ReferenceSource, decode_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_KEY_PREFIX = "folder:"


class FolderReferenceSource:
    """Every image file under a folder (recursively) is a target-class reference.

    Keys are ``folder:<relative/path>`` so they can never be mistaken for training keys. Picklable (holds paths).
    """

    def __init__(self, path: str):
        self.path = str(path)
        root = Path(self.path)
        if not root.exists():
            raise FileNotFoundError(f"reference folder not found: {self.path}")
        if not root.is_dir():
            raise ValueError(f"reference folder path is not a folder: {self.path}")
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"reference folder {self.path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        # Absolute paths: workers may run with another working directory.
        self._files = {FOLDER_KEY_PREFIX + p.relative_to(root).as_posix(): str(p.resolve()) for p in files}

    def candidates(self, target_label: int) -> list[str]:
        return sorted(self._files)

    def load(self, keys: Sequence[str]) -> dict[str, bytes]:
        out = {}
        for key in keys:
            try:
                path = self._files[key]
            except KeyError:
                raise KeyError(f"{key!r} is not an image of reference folder {self.path}") from None
            with open(path, "rb") as handle:
                out[key] = handle.read()
        return out

    def __repr__(self) -> str:
        return f"FolderReferenceSource({self.path!r})"


def draw_pool(
    source: ReferenceSource,
    target_label: int,
    size: int | None,
    seed: int,
    *,
    field: str = "reference_pool_size",
) -> tuple[list[str], int, dict[str, bytes]]:
    """The reference pool: ``size`` candidates with the smallest hash that decode as images, sorted by key.

    Returns (pool, rejected, data): rejected counts candidates skipped because they do not decode, data holds the
    encoded bytes of the pool (read once here to check them). Raises ValueError naming ``field`` when there are no
    candidates or fewer usable ones than asked.
    """
    candidates = sorted(set(source.candidates(target_label)))
    if not candidates:
        raise ValueError(f"{field}: no target-class reference images are available (target label {target_label})")
    if size is not None and size < 1:
        raise ValueError(f"{field} must be >= 1 (or null for all candidates), got {size}")
    wanted = len(candidates) if size is None else size
    if wanted > len(candidates):
        raise ValueError(
            f"{field}={size} but only {len(candidates)} target-class reference images are available; "
            f"set {field} to at most {len(candidates)} (or null for all)"
        )
    ranked = sorted(candidates, key=lambda k: (key_uniform(seed, k, "pool"), k))
    pool: list[str] = []
    data: dict[str, bytes] = {}
    rejected = 0
    batch = max(16, wanted)
    position = 0
    while len(pool) < wanted and position < len(ranked):
        chunk = ranked[position : position + batch]
        position += len(chunk)
        loaded = source.load(chunk)
        for key in chunk:
            if len(pool) >= wanted:
                break
            if _decodes(loaded.get(key)):
                pool.append(key)
                data[key] = loaded[key]
            else:
                rejected += 1
    if len(pool) < wanted:
        raise ValueError(
            f"{field}={size}: only {len(pool)} of {len(candidates)} reference images decode as images "
            f"({rejected} unreadable); lower {field}"
        )
    return sorted(pool), rejected, data


def _decodes(data: bytes | None) -> bool:
    if not data:
        return False
    try:
        image = decode_rgb(data)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return min(image.size) >= 2
