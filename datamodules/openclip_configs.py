"""open_clip model configs by name, including clbd's tiny ones for tests and CPU smoke runs.

The tiny configs are JSON files in ``lightning_modules/model_configs``; they are registered with open_clip here,
in the lower layer, because the data pipeline needs a model's image size, normalisation and tokenizer too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "lightning_modules" / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make clbd's tiny configs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def open_clip_config(model_name: str) -> dict[str, Any]:
    import open_clip

    register_model_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        known = sorted(open_clip.list_models())
        ours = [name for name in known if name.startswith("clip-tiny")]
        raise ValueError(
            f"model_name: unknown open_clip model {model_name!r}; e.g. RN50, ViT-B-32, {', '.join(ours)} "
            f"({len(known)} known: open_clip.list_models())"
        )
    return config
