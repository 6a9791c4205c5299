"""CLIP's training image made on the device (datamodules.device_clip) against open_clip's per-sample preprocess.

Same (seed, epoch, key) -> the same crop, drawn by the transform's own ``get_params``; then two comparisons, in grey
levels (1/255) of the image before normalisation:
* against PIL's own bicubic resampling run in float (mode "F", clipped after each pass as PIL's uint8 path clips):
  equal to float rounding (the device path computes the same function);
* against open_clip's transform on the PIL image (what the loaders do without the option): PIL resamples uint8
  with fixed-point weights and rounds to uint8 after each of its two passes. Measured: max 1.08, mean 0.25-0.31
  (tiny 32 px and 224 px configs, train and eval transforms, photos and generated images, shrinking and enlarging).
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as F

from clbd import main
from datamodules.device_clip import CLIPImageParams, DeviceCLIPImages, DeviceCLIPImagesHook, P
from datamodules.device_views import pad_collate
from datamodules.modalities import CLIPDataModule
from datamodules.multimodal import TACleanerDataModule
from datamodules.stream import default_collate
from datamodules.views import CLIPPreprocess
from tests.conftest import shared_data
from tests.test_device_views import photo_like

# (width, height): shrinking and enlarging to 32 px and to 224 px, both orientations. The train transform's random
# crops need a side ratio within 3/4..4/3 at its 0.9-1.0 area: 260 x 300 and 30 x 28 get them; the other sizes its
# fixed central fallback crop.
ODD_SIZES = ((300, 200), (150, 500), (640, 427), (260, 300), (30, 28))
CONFIGS = [("clip-tiny-vit", True), ("clip-tiny-vit", False), ("ViT-B-32", True), ("ViT-B-32", False)]
CONFIG_IDS = ["tiny_train", "tiny_eval", "224_train", "224_eval"]


def generated_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [photo_like(rng, height, width) for width, height in ODD_SIZES]


def coco_photos(n: int = 6) -> list[Image.Image]:
    photos = []
    with tarfile.open(shared_data("coco-mini.tar.gz")) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                photos.append(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                if len(photos) == n:
                    return photos
    return photos


def device_images(preprocess: CLIPPreprocess, images: list[Image.Image], epoch: int = 2):
    params = CLIPImageParams(preprocess)
    batch = pad_collate(default_collate)([params(image, f"key_{i}", epoch) for i, image in enumerate(images)])
    rows = batch["image_params"].clone()
    made = DeviceCLIPImages(preprocess)(batch["image_u8"], batch["image_params"], normalize=False)
    return made * 255, rows


def cpu_images(preprocess: CLIPPreprocess, images: list[Image.Image], epoch: int = 2) -> torch.Tensor:
    """open_clip's transform per image (uint8 PIL resampling), back to the 0..255 scale."""
    made = torch.stack([preprocess.image(image, f"key_{i}", epoch) for i, image in enumerate(images)])
    std, mean = torch.tensor(preprocess.std).view(1, 3, 1, 1), torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    return (made * std + mean) * 255


def _clipped(channel: Image.Image) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(channel), 0, 255), mode="F")


def pil_float_reference(preprocess: CLIPPreprocess, image: Image.Image, row: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic resampling in float, one channel at a time, horizontal pass then vertical, clipped after each;
    the eval transform's resized size and centre crop taken from torchvision's own Resize and center_crop."""
    size, channels = preprocess.image_size, []
    if preprocess.train:
        top, left, height, width = (int(row[P[k]]) for k in ("top", "left", "height", "width"))
    else:
        width, height = preprocess.transform.transforms[0](image).size
    for c in range(3):
        channel = Image.fromarray(np.asarray(image)[..., c].astype(np.float32), mode="F")
        if preprocess.train:
            channel = channel.crop((left, top, left + width, top + height))
            channel = _clipped(channel.resize((size, height), Image.BICUBIC)).resize((size, size), Image.BICUBIC)
        else:
            channel = _clipped(channel.resize((width, image.height), Image.BICUBIC)).resize(
                (width, height), Image.BICUBIC
            )
            channel = F.center_crop(channel, [size, size])
        channels.append(np.clip(np.asarray(channel), 0, 255))
    return torch.from_numpy(np.stack(channels))


@pytest.mark.parametrize("model_name, train", CONFIGS, ids=CONFIG_IDS)
def test_device_images_equal_pils_resampling_in_float(model_name, train):
    preprocess = CLIPPreprocess(model_name, train=train, seed=3)
    images = generated_images()
    made, rows = device_images(preprocess, images)
    reference = torch.stack([pil_float_reference(preprocess, image, rows[i]) for i, image in enumerate(images)])
    assert (made - reference).abs().max() < 0.02  # float32 rounding only (measured: at most 0.0034)


def _check_against_the_cpu_path(preprocess: CLIPPreprocess, images: list[Image.Image]) -> None:
    made, _ = device_images(preprocess, images)
    difference = (made - cpu_images(preprocess, images)).abs()
    # PIL's two uint8 passes each round (<= 0.5, carried through the second pass's weights): measured max 1.08.
    assert difference.max() <= 1.25, difference.max()
    assert difference.mean() < 0.4, difference.mean()  # measured 0.25-0.31


@pytest.mark.parametrize("model_name, train", CONFIGS, ids=CONFIG_IDS)
def test_device_images_match_open_clips_preprocess_up_to_uint8_rounding(model_name, train):
    _check_against_the_cpu_path(CLIPPreprocess(model_name, train=train, seed=3), generated_images())


@pytest.mark.shared_data
@pytest.mark.parametrize("model_name, train", CONFIGS, ids=CONFIG_IDS)
def test_device_images_match_open_clips_preprocess_on_coco_photos(model_name, train):
    _check_against_the_cpu_path(CLIPPreprocess(model_name, train=train, seed=3), coco_photos())


def test_crops_are_the_cpu_paths_own_draws():
    """Another epoch or key gives another crop, the same ones the same; the caller's generator is left as it was."""
    params = CLIPImageParams(CLIPPreprocess("clip-tiny-vit", train=True, seed=7))
    image = generated_images()[3]
    first = params(image, "a", 0)["image_params"]
    assert torch.equal(first, params(image, "a", 0)["image_params"])
    assert not torch.equal(first, params(image, "a", 1)["image_params"])
    assert not torch.equal(first, params(image, "b", 0)["image_params"])
    state = torch.get_rng_state()
    params(image, "a", 0)
    assert torch.equal(state, torch.get_rng_state())


def test_images_stay_float32_inside_a_bf16_autocast_region():
    preprocess = CLIPPreprocess("clip-tiny-vit", train=True, seed=3)
    params = CLIPImageParams(preprocess)
    batch = pad_collate(default_collate)([params(image, str(i), 0) for i, image in enumerate(generated_images())])
    transform = DeviceCLIPImages(preprocess)
    plain = transform(batch["image_u8"], batch["image_params"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = transform(batch["image_u8"], batch["image_params"])
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def _bilinear_transform(image_transform):
    def patched(*args, **kwargs):
        return image_transform(*args, **{**kwargs, "interpolation": "bilinear"})

    return patched


def test_a_transform_it_cannot_reproduce_is_refused_before_compute(monkeypatch):
    preprocess = CLIPPreprocess("clip-tiny-vit", train=True)
    jitter = {"color_jitter": (0.4, 0.4, 0.4, 0.1), "color_jitter_prob": 0.8}
    preprocess.transform = open_clip.image_transform(32, is_train=True, aug_cfg=jitter)
    with pytest.raises(ValueError, match="data.images_on_device: no device version.*color_jitter"):
        DeviceCLIPImagesHook(preprocess)
    monkeypatch.setattr(open_clip, "image_transform", _bilinear_transform(open_clip.image_transform))
    with pytest.raises(ValueError, match="data.images_on_device"):
        CLIPDataModule(model_name="clip-tiny-vit", train_augment=False, images_on_device=True)
    CLIPDataModule(model_name="clip-tiny-vit", train_augment=False)  # without the option nothing is checked


def _first_batches(module, device_made: bool):
    batch = next(iter(module.train_dataloader()))
    return module.on_after_batch_transfer(batch, 0) if device_made else batch


@pytest.mark.parametrize("module_class", [CLIPDataModule, TACleanerDataModule], ids=["clip", "tacleaner"])
def test_datamodule_hands_over_uint8_and_makes_the_image_after_the_transfer(make_shards, module_class):
    """TA-Cleaner (a CleanCLIP data module) keeps its CPU-made ``image_aug``, ``text_aug`` and subtexts, unchanged."""
    shards = make_shards(n=32, per_shard=16, captions=True)
    common = dict(
        train_shards=str(shards / "train.index.json"),
        val_shards=None,
        batch_size=16,
        num_workers=0,
        model_name="clip-tiny-vit",
    )
    on_cpu = _first_batches(module_class(**common), device_made=False)
    on_device = module_class(**common, images_on_device=True)
    raw = next(iter(on_device.train_dataloader()))
    assert raw["image_u8"].dtype == torch.uint8 and raw["image_params"].shape == (16, len(P)) and "image" not in raw
    made = on_device.on_after_batch_transfer(raw, 0)
    assert made.keys() == on_cpu.keys() and made["key"] == on_cpu["key"]
    assert made["image"].shape == on_cpu["image"].shape == (16, 3, 32, 32)
    std = torch.tensor(on_device._train_preprocess().std).view(1, 3, 1, 1)
    assert ((made["image"] - on_cpu["image"]) * std * 255).abs().max() <= 1.25
    for name in set(made) - {"image"}:
        same = (
            torch.equal(made[name], on_cpu[name])
            if isinstance(made[name], torch.Tensor)
            else made[name] == on_cpu[name]
        )
        assert same, name


def test_batches_read_outside_lightnings_loop_are_made_too(make_shards):
    """A defense's own passes over the training data (MCLDef's inversion, UBT's detection) get finished images."""
    shards = make_shards(n=32, per_shard=16, captions=True)
    common = dict(train_shards=str(shards / "train.index.json"), val_shards=None, batch_size=16, num_workers=0)
    batches = CLIPDataModule(**common, images_on_device=True).train_batches(torch.device("cpu"))
    for _ in range(2):  # iterable more than once, as UBT's overfitting passes need
        images = [batch["image"] for batch in batches]
        assert len(images) == 2 and images[0].shape == (16, 3, 32, 32) and images[0].dtype == torch.float32
    plain = next(iter(CLIPDataModule(**common).train_batches(torch.device("cpu"))))
    assert torch.equal(plain["image"], next(iter(CLIPDataModule(**common).train_dataloader()))["image"])


def test_a_clip_fit_runs_with_the_images_made_on_the_device(tmp_path, make_shards):
    shards = make_shards(n=32, per_shard=16, captions=True)
    run = tmp_path / "run"
    args = [
        "--model=lightning_modules.CLIP",
        "--model.model_name=clip-tiny-vit",
        "--data=datamodules.CLIPDataModule",
        "--data.model_name=clip-tiny-vit",
        "--data.images_on_device=true",
        f"--data.train_shards={shards}/train.index.json",
        "--data.val_shards=null",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--data.attack=poisoning.BadNet",
        "--data.attack.target_class=class1",
        "--data.attack.rate=0.2",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run}",
    ]
    assert main(["fit", *args]) == 0
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
