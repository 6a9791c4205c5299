"""open_clip model configs by name, including clbd's tiny ones for tests and CPU smoke runs.

The tiny configs are JSON files in ``datamodules/model_configs``, registered with open_clip here in the lower layer
because the data pipeline needs a model's image size, normalisation and tokenizer too; the models in
``lightning_modules`` read them through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


def clbd_model_config_names() -> list[str]:
    """Names of the open_clip model configs shipped in ``datamodules/model_configs``."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def register_model_configs() -> list[str]:
    """Make clbd's tiny configs known to open_clip (idempotent); returns their names.

    Afterwards ``open_clip.create_model("clip-tiny-vit")`` and ``open_clip.get_tokenizer("clip-tiny-vit")`` work
    offline.
    """
    import open_clip

    names = clbd_model_config_names()
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return names


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
