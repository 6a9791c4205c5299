"""``model.pretrained`` as an open_clip tag: open_clip's own registry, download and cache lookup, no network.

The tests register tags for the tiny ``clip-tiny-vit`` config in open_clip's registry and lay its weights out
where open_clip's download would put them (Hugging Face's cache, or open_clip's URL cache); what runs is open_clip's
and huggingface_hub's real cache lookup. Any attempt to open a connection fails the test.
"""

from __future__ import annotations

import socket

import open_clip
import pytest
import torch
from open_clip import pretrained as registry

from datamodules.openclip_configs import open_clip_config
from lightning_modules import CLIP

MODEL = "clip-tiny-vit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test of the cache opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tags(monkeypatch, tmp_path):
    """Two tags of the tiny model in open_clip's registry (one on the HF hub, one by URL); the cache folder."""
    open_clip_config(MODEL)
    monkeypatch.setitem(
        registry._PRETRAINED,
        MODEL,
        {
            "clbd_hub": registry._pcfg(hf_hub="clbd-test/clip-tiny-vit/"),
            "clbd_url": registry._pcfg(url="https://weights.invalid/v1/clip-tiny-vit-clbd.pt"),
        },
    )
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLBD_PRETRAINED_CACHE", str(cache))
    return cache


def saved_weights(path) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    weights = open_clip.create_model(MODEL).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, path)
    return weights


def assert_loaded(module: CLIP, weights: dict[str, torch.Tensor]) -> None:
    loaded = module.model.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_a_hub_tag_offline_comes_from_the_hugging_face_cache(tags, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tags / "models--clbd-test--clip-tiny-vit"
    weights = saved_weights(repo / "snapshots" / COMMIT / "open_clip_pytorch_model.bin")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert_loaded(CLIP(model_name=MODEL, pretrained="clbd_hub"), weights)


def test_a_url_tag_online_is_read_from_open_clips_cache(tags, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    weights = saved_weights(tags / "clip-tiny-vit-clbd.pt")  # where download_pretrained_from_url keeps it
    assert_loaded(CLIP(model_name=MODEL, pretrained="clbd_url"), weights)


@pytest.mark.parametrize("tag", ["clbd_hub", "clbd_url"])
def test_a_tag_absent_from_the_cache_offline_is_a_clear_error(tags, monkeypatch, no_network, tag):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as missing:
        CLIP(model_name=MODEL, pretrained=tag)
    message = str(missing.value)
    assert message.startswith(f"model.pretrained: open_clip's '{MODEL}' weights '{tag}' are not available: offline")
    assert str(tags) in message


def test_an_unknown_tag_names_the_tags_open_clip_knows(no_network):
    with pytest.raises(ValueError) as unknown:
        CLIP(model_name="RN50", pretrained="laion9000")
    message = str(unknown.value)
    assert "'laion9000' is neither a local file nor an open_clip pretrained tag of model_name='RN50'" in message
    assert "openai" in message and "yfcc15m" in message
    with pytest.raises(ValueError, match="none: open_clip has no pretrained weights for clip-tiny-rn"):
        CLIP(model_name="clip-tiny-rn", pretrained="openai")


def test_a_missing_file_is_still_named_as_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint file at .*weights\.pt"):
        CLIP(model_name=MODEL, pretrained=str(tmp_path / "weights.pt"))


def test_badclips_victim_from_a_tag_offline(tags, monkeypatch, no_network):
    """``clbd poison optimize-trigger --checkpoint openai --model RN50``: the victim from open_clip's cache."""
    from clbd.badclip_trigger import load_victim

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = saved_weights(tags / "clip-tiny-vit-clbd.pt")  # open_clip's URL cache, read without a connection
    victim, name = load_victim("clbd_url", MODEL)
    assert name == MODEL and not any(p.requires_grad for p in victim.parameters())
    loaded = victim.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    with pytest.raises(
        ValueError, match=r"^checkpoint: 'nope' is neither a local file nor an open_clip pretrained tag"
    ):
        load_victim("nope", MODEL)
    with pytest.raises(FileNotFoundError, match=r"^checkpoint: .*'clbd_hub' are not available: offline"):
        load_victim("clbd_hub", MODEL)
