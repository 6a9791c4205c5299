"""``model.pretrained``: a local file, or one of open_clip's pretrained tags (``openai``, ``laion2b_s34b_b79k``, ...).

A tag goes through open_clip's own registry, download and cache (``open_clip.get_pretrained_cfg`` /
``download_pretrained``): online it downloads into the cache once (Hugging Face's cache, ``HF_HOME`` /
``HF_HUB_CACHE``, or ``~/.cache/clip`` for open_clip's URL downloads; ``CLBD_PRETRAINED_CACHE`` puts both in one
folder); offline (``HF_HUB_OFFLINE=1``) it reads the cache alone and never opens a connection. A tag the cache lacks
offline, a failed download or an unknown tag is a clear error naming the model and the tag (and the tags open_clip
knows for the model), before anything is built.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import open_clip
from open_clip import pretrained as open_clip_pretrained

CACHE_ENV = "CLBD_PRETRAINED_CACHE"
OFFLINE_ENV = "HF_HUB_OFFLINE"
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


def offline() -> bool:
    """Hugging Face's offline switch (``HF_HUB_OFFLINE``), read now (huggingface_hub reads it once, at import)."""
    if os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    with contextlib.suppress(ImportError):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def cache_dir() -> str | None:
    """Where open_clip caches downloads: ``CLBD_PRETRAINED_CACHE`` when set, else open_clip's own defaults."""
    return os.environ.get(CACHE_ENV) or None


@contextlib.contextmanager
def hub_offline(enabled: bool) -> Iterator[None]:
    """huggingface_hub serves its cache without any request while its offline constant is set."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def is_tag(model_name: str, pretrained: str) -> bool:
    """Whether ``pretrained`` names open_clip weights rather than a file: not an existing path, not path-like."""
    if Path(pretrained).exists() or os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES):
        return False
    return True


def ensure_cached(model_name: str, tag: str) -> str:
    """The local file of open_clip's ``tag`` weights for ``model_name``: from the cache, downloaded into it when
    online. Raises a clear error naming the model and the tag otherwise."""
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        shown = ", ".join(known) if known else f"none: open_clip has no pretrained weights for {model_name}"
        raise ValueError(
            f"model.pretrained: {tag!r} is neither a local file nor an open_clip pretrained tag of "
            f"model_name={model_name!r} (its tags: {shown})"
        )
    folder, is_offline = cache_dir(), offline()
    url = config.get("url", "")
    via_url = bool(url) and not (config.get("hf_hub") and open_clip_pretrained.has_hf_hub())
    if is_offline and via_url:
        cached = Path(folder or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if not cached.is_file():  # open_clip's URL download has no offline switch: look before it would connect
            raise FileNotFoundError(_missing(model_name, tag, f"not in the cache ({cached})", is_offline))
    try:
        with hub_offline(is_offline):
            path = open_clip.download_pretrained(config, cache_dir=folder)
    except Exception as exc:  # huggingface_hub's and urllib's errors: one clear line, naming what was asked
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(_missing(model_name, tag, reason, is_offline)) from None
    if not path or not Path(path).is_file():
        raise FileNotFoundError(_missing(model_name, tag, "open_clip returned no file", is_offline))
    return path


def _missing(model_name: str, tag: str, reason: str, is_offline: bool) -> str:
    where = cache_dir() or "open_clip's default cache (HF_HUB_CACHE / ~/.cache/clip)"
    mode = (
        f"offline ({OFFLINE_ENV}=1): only the cache is read; run once online, or copy the weights into {where}"
        if is_offline
        else "the download failed"
    )
    return f"model.pretrained: open_clip's {model_name!r} weights {tag!r} are not available: {mode} ({reason})"
