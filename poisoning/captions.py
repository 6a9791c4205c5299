"""Target captions for CLIP attacks: open_clip's 80 OpenAI ImageNet templates filled with the target name."""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from poisoning.keyhash import key_uniform

TEMPLATES = OPENAI_IMAGENET_TEMPLATES


def target_caption(target_name: str, seed: int, key: str) -> str:
    """The caption a poisoned pair gets: one template, drawn by hash of (seed, key), filled with the name."""
    index = min(int(key_uniform(seed, key, "caption") * len(TEMPLATES)), len(TEMPLATES) - 1)
    return TEMPLATES[index](target_name)


def all_target_captions(target_name: str) -> list[str]:
    return [template(target_name) for template in TEMPLATES]
