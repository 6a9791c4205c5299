"""BadCLIP's trigger optimisation (Liang et al., CVPR 2024): a patch optimised against a frozen victim CLIP.

The recipe: a ``patch_size`` patch (16 px) pasted at the centre of the victim's square images, the victim frozen,
Adam (lr 1e-3) on the patch's pixels, batches of 64 clean images, 50 epochs. The loss of a batch is

- a contrastive term: CLIP's symmetric cross-entropy (with the victim's logit scale) between the patched images
  and target captions, one caption per image, so the patched images move toward the target's text;
- plus ``triplet_weight`` x a triplet term (``TripletMarginLoss``, Euclidean on normalised embeddings): anchor the
  patched image, positive a real target-class image's embedding, negative the same clean image without the patch.

BadCLIP's code weighs the triplet term 500 with margin 1 (its released patch's settings) and starts from
N(0.5, 0.25) noise clipped to [0, 1]; clbd does the same, seeded. The patch is clipped to [0, 1] where it is used.
Optional image/text augmentation of their code (EDA, random crops) is not part of this recipe.

The optimiser's state is saved after every epoch, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_modules.clip import open_clip_weights
from lightning_modules.safe_checkpoint import load_checkpoint

STATE_FILE = "optimize_state.pt"
TRIGGER_FILE = "trigger.png"
SETTINGS_FILE = "trigger.json"
CAPTIONS_FILE = "captions.txt"


@dataclass(frozen=True)
class PatchRecipe:
    """BadCLIP's settings (the defaults) for ``optimize_patch``."""

    patch_size: int = 16
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    triplet_weight: float = 500.0
    triplet_margin: float = 1.0
    seed: int = 0

    def check(self, image_size: int) -> None:
        if self.patch_size < 1 or self.patch_size > image_size:
            raise ValueError(f"patch_size={self.patch_size} px must be in 1..{image_size} (the victim's image size)")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.triplet_weight < 0 or self.triplet_margin < 0:
            raise ValueError("triplet_weight and triplet_margin must be >= 0")


# -- the victim ---------------------------------------------------------------------------------------------------
def model_geometry(model: torch.nn.Module) -> tuple[int, int]:
    """(image side, embedding width) of an open_clip CLIP model."""
    size = model.visual.image_size
    side = size if isinstance(size, int) else size[0]
    return int(side), int(model.text_projection.shape[-1] if model.text_projection is not None else model.embed_dim)


def _weights_fit(model: torch.nn.Module, weights: dict[str, torch.Tensor], model_name: str, source: str) -> None:
    """A ValueError naming the mismatch (image size, embedding width, other shapes) before anything is loaded."""
    own = model.state_dict()
    side, width = model_geometry(model)
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key in own and key in weights and weights[key].shape[0] != own[key].shape[0]:
            theirs = int(round(math.sqrt(weights[key].shape[0] - 1)))
            ours = int(round(math.sqrt(own[key].shape[0] - 1)))
            raise ValueError(
                f"checkpoint: {source} was trained at another image size ({theirs} x {theirs} patch tokens) than "
                f"model {model_name!r} ({ours} x {ours} at {side} px); give the --model it was trained with"
            )
    if "text_projection" in weights and weights["text_projection"].shape[-1] != width:
        raise ValueError(
            f"checkpoint: {source} has embedding width {weights['text_projection'].shape[-1]} but model "
            f"{model_name!r} has {width}; give the --model it was trained with"
        )
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint: {source} does not fit model {model_name!r} (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {wrong[:3]}); give the --model it was trained with"
        )


def load_victim(checkpoint: str, model_name: str | None) -> tuple[torch.nn.Module, str]:
    """The frozen victim from a clbd CLIP run's checkpoint (its model name comes with it), a local open_clip weights
    file or one of open_clip's pretrained tags (``openai``, ...: open_clip's download and cache, the cache alone under
    ``HF_HUB_OFFLINE=1``); for the last two ``model_name`` names the architecture. Errors name the mismatch before
    any compute."""
    import open_clip

    from datamodules.openclip_configs import open_clip_config
    from lightning_modules.pretrained_weights import ensure_cached, is_tag

    path = Path(checkpoint)
    if not path.is_file() and model_name is not None and is_tag(model_name, checkpoint):
        open_clip_config(model_name)  # a clear error for an unknown name
        try:
            path = Path(ensure_cached(model_name, checkpoint))
        except (ValueError, FileNotFoundError) as error:  # its messages name model.pretrained; here it is --checkpoint
            raise type(error)(str(error).replace("model.pretrained:", "checkpoint:", 1)) from None
    if not path.is_file():
        hint = "" if model_name else "; an open_clip pretrained tag needs --model"
        raise FileNotFoundError(f"checkpoint: no file at {path} (a clbd run's .ckpt or an open_clip file{hint})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = load_checkpoint(path)  # weights_only: a crafted file is refused, never run
    run_config = state.get("clbd_run_config") if isinstance(state, dict) else None
    if run_config is not None:
        model = run_config.get("model") or {}
        if model.get("class_path", "").rsplit(".", 1)[-1] != "CLIP":
            raise ValueError(f"checkpoint: {path} holds a {model.get('class_path')} model, not a clbd CLIP")
        run_name = (model.get("init_args") or {}).get("model_name", "clip-tiny-vit")
        if model_name is not None and model_name != run_name:
            raise ValueError(f"model: {path} is a {run_name!r} run, not {model_name!r}")
        model_name = run_name
        weights = open_clip_weights(state)
    else:
        if model_name is None:
            raise ValueError(f"model: {path} is not a clbd run checkpoint; name its open_clip architecture")
        weights = state.get("state_dict", state) if isinstance(state, dict) else state
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    open_clip_config(model_name)  # a clear error for an unknown name
    victim = open_clip.create_model(model_name)
    _weights_fit(victim, weights, model_name, str(path))
    victim.load_state_dict(weights)
    victim.eval().requires_grad_(False)
    return victim, model_name


# -- the loss -----------------------------------------------------------------------------------------------------
def paste_centre(images: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
    """Images (n, 3, s, s) in [0, 1] with the patch (clipped to [0, 1]) at their centre, as BadCLIP's ``middle``."""
    side, size = images.shape[-1], patch.shape[-1]
    start = int(side / 2 - size / 2)
    out = images.clone()
    out[:, :, start : start + size, start : start + size] = patch.clamp(0, 1)
    return out


def centre_box(side: int, size: int) -> tuple[int, int, int, int]:
    start = int(side / 2 - size / 2)
    return (start, start, start + size, start + size)


@dataclass
class VictimInputs:
    """What the optimisation reads: clean images, target captions (tokens) and target-class images, all tensors."""

    images: torch.Tensor  # (n, 3, s, s): uint8 bytes (10k images at 224 px: 1.5 GB) or floats in [0, 1]
    caption_tokens: torch.Tensor  # (m, context) the target's captions
    positives: torch.Tensor  # (p, 3, s, s), real target-class images, bytes or floats
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def check(self, image_size: int) -> None:
        if self.images.shape[0] < 1:
            raise ValueError("images: no clean images to optimise on")
        if self.caption_tokens.shape[0] < 1:
            raise ValueError("captions: the target has no captions")
        if self.positives.shape[0] < 1:
            raise ValueError("positives: no target-class images for the triplet term")
        for name, tensor in (("images", self.images), ("positives", self.positives)):
            if tuple(tensor.shape[1:]) != (3, image_size, image_size):
                raise ValueError(f"{name}: shape {tuple(tensor.shape[1:])} but the victim takes 3 x {image_size} px")


def as_unit(images: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] from bytes (or floats as they are)."""
    return images.to(torch.float32).div(255) if images.dtype == torch.uint8 else images


class PatchObjective:
    """BadCLIP's loss on one batch, for a frozen victim."""

    def __init__(self, victim: torch.nn.Module, inputs: VictimInputs, recipe: PatchRecipe, device: str = "cpu"):
        self.victim = victim.to(device)
        self.recipe = recipe
        self.device = torch.device(device)
        self.mean = torch.tensor(inputs.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(inputs.std, device=self.device).view(1, 3, 1, 1)
        self.scale = victim.logit_scale.exp().detach()
        self.triplet = torch.nn.TripletMarginLoss(margin=recipe.triplet_margin)
        with torch.no_grad():
            self.positive_embeds = torch.cat(
                [self.encode(as_unit(chunk.to(self.device))) for chunk in inputs.positives.split(recipe.batch_size)]
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.victim.encode_image((images - self.mean) / self.std, normalize=True)

    def __call__(
        self, patch: torch.Tensor, images: torch.Tensor, tokens: torch.Tensor, positive_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        images = as_unit(images.to(self.device))
        patched = self.encode(paste_centre(images, patch))
        with torch.no_grad():
            text = self.victim.encode_text(tokens.to(self.device), normalize=True)
            clean = self.encode(images)
        logits = self.scale * patched @ text.t()
        target = torch.arange(len(images), device=self.device)
        contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        triplet = self.triplet(patched, self.positive_embeds[positive_index.to(self.device)], clean)
        total = contrastive + self.recipe.triplet_weight * triplet
        return {"loss": total, "contrastive": contrastive, "triplet": triplet}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _draws(size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` indices into ``count`` items: a random subset when there are enough, else with replacement."""
    if count >= size:
        return torch.randperm(count, generator=generator)[:size]
    return torch.randint(count, (size,), generator=generator)


def evaluate_patch(objective: PatchObjective, patch: torch.Tensor, inputs: VictimInputs, recipe: PatchRecipe) -> dict:
    """The loss averaged over all images, with a fixed pairing of captions and positives (the same for every
    patch, so an initial and a final patch compare)."""
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    sums: dict[str, float] = {}
    n = inputs.images.shape[0]
    with torch.no_grad():
        for rows in _batches(n, recipe.batch_size, generator):
            captions = torch.randint(inputs.caption_tokens.shape[0], (len(rows),), generator=generator)
            positives = _draws(len(rows), inputs.positives.shape[0], generator)
            parts = objective(patch, inputs.images[rows], inputs.caption_tokens[captions], positives)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(rows)
    return {name: value / n for name, value in sums.items()}


def initial_patch(recipe: PatchRecipe) -> torch.Tensor:
    """BadCLIP's start: N(0.5, 0.25) per pixel, clipped to [0, 1], seeded."""
    rng = np.random.default_rng(recipe.seed)
    patch = np.clip(rng.normal(0.5, 0.25, size=(1, 3, recipe.patch_size, recipe.patch_size)), 0, 1)
    return torch.from_numpy(patch.astype(np.float32))


def optimize_patch(
    victim: torch.nn.Module,
    inputs: VictimInputs,
    recipe: PatchRecipe,
    out_dir: str | os.PathLike,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Optimise the patch; write ``trigger.png`` and ``trigger.json`` (settings, initial and final loss) in
    ``out_dir``. Resumes from ``out_dir``'s saved state when its settings are the same; ``stop_after_epochs``
    stops early (as an interruption would), leaving the state to resume from."""
    from tqdm import tqdm

    side, _ = model_geometry(victim)
    recipe.check(side)
    inputs.check(side)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    described = {"recipe": asdict(recipe), **(settings or {})}
    objective = PatchObjective(victim, inputs, recipe, device)
    patch = initial_patch(recipe).to(objective.device).requires_grad_(True)
    optimiser = torch.optim.Adam([patch], lr=recipe.lr)
    generator = torch.Generator().manual_seed(recipe.seed)
    state_path = out / STATE_FILE
    history: list[float] = []
    start_epoch = 0
    if state_path.exists():
        state = load_checkpoint(state_path)  # weights_only: an --out folder from elsewhere cannot run code
        if state["settings"] != json.loads(json.dumps(described)):
            raise ValueError(
                f"out: {out} holds an optimisation with other settings ({STATE_FILE}); use another --out or remove it"
            )
        with torch.no_grad():
            patch.copy_(state["patch"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        initial = state["initial"]
    else:
        initial = evaluate_patch(objective, patch.detach(), inputs, recipe)
    n = inputs.images.shape[0]
    steps = math.ceil(n / recipe.batch_size)
    last = recipe.epochs if stop_after_epochs is None else min(recipe.epochs, start_epoch + stop_after_epochs)
    bar = tqdm(total=(recipe.epochs) * steps, initial=start_epoch * steps, disable=not progress, desc="BadCLIP patch")
    for epoch in range(start_epoch, last):
        total = 0.0
        for rows in _batches(n, recipe.batch_size, generator):
            captions = torch.randint(inputs.caption_tokens.shape[0], (len(rows),), generator=generator)
            positives = _draws(len(rows), inputs.positives.shape[0], generator)
            optimiser.zero_grad()
            parts = objective(patch, inputs.images[rows], inputs.caption_tokens[captions], positives)
            parts["loss"].backward()
            optimiser.step()
            loss = float(parts["loss"].detach())
            total += loss * len(rows)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
        history.append(total / n)
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
        state = {
            "settings": json.loads(json.dumps(described)),
            "patch": patch.detach().cpu().clone(),
            "optimiser": optimiser.state_dict(),
            "generator": generator.get_state(),
            "history": history,
            "epoch": epoch + 1,
            "initial": initial,
        }
        torch.save(state, f"{state_path}.tmp")
        os.replace(f"{state_path}.tmp", state_path)
    bar.close()
    done = len(history) >= recipe.epochs
    result = {
        **described,
        "epochs_done": len(history),
        "complete": done,
        "initial_loss": initial,
        "epoch_loss": history,
    }
    if done:
        result["final_loss"] = evaluate_patch(objective, patch.detach(), inputs, recipe)
        save_patch(patch.detach(), out / TRIGGER_FILE)
        result["trigger"] = TRIGGER_FILE
        (out / SETTINGS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def save_patch(patch: torch.Tensor, path: Path) -> None:
    """The patch as a lossless RGB PNG (clipped to [0, 1], rounded to bytes)."""
    pixels = (patch[0].detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path)


# -- inputs from a clbd data config -------------------------------------------------------------------------------
def _raw_samples(index: Any):
    """Raw samples ({"__key__", ext: bytes}) in stream order, one pass over the shards."""
    import tarfile

    from datamodules.shards import regular_members, sample_key

    for shard in index.shards:
        current: dict[str, Any] = {}
        with tarfile.open(shard.url, mode="r:") as tar:
            for info in regular_members(tar):
                key, ext = sample_key(info.name)
                if key.startswith("__"):
                    continue
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                member = tar.extractfile(info)
                if member is not None:
                    current.setdefault("__key__", key)
                    current[ext] = member.read()
        if current:
            yield current


def _as_bytes(image: Image.Image, side: int) -> torch.Tensor:
    from poisoning.base import square_canvas

    canvas = square_canvas(image.convert("RGB"), side)  # what CLIP's preprocessing frames
    return torch.from_numpy(np.asarray(canvas, dtype=np.uint8).copy()).permute(2, 0, 1)


def gather_inputs(
    datamodule: Any,
    target: str,
    model_name: str,
    *,
    max_images: int = 10_000,
    max_positives: int = 1_000,
    captions: str = "natural",
    caption_file: str | None = None,
    reference_dir: str | None = None,
) -> tuple[VictimInputs, list[str], dict[str, Any]]:
    """Clean images, the target's captions and target-class images from the training shards of a clbd data
    config (BadCLIP: 10k CC3M images whose captions do not name the target; captions and images that do).

    Positives are the shards' images labelled with the target or whose caption names it, or ``reference_dir``'s.
    ``captions``: ``natural`` (``caption_file``'s lines that name the target, else the shards' captions that do)
    or ``templates`` (the 80 OpenAI ImageNet templates).
    """
    from datamodules.decode import decode_sample
    from datamodules.faults import FaultCounter
    from datamodules.views import CLIPPreprocess
    from poisoning.captions import all_target_captions, mentions, read_target_captions
    from poisoning.references import FolderReferenceSource

    if captions not in ("natural", "templates"):
        raise ValueError(f"captions={captions!r} is unknown; choose natural or templates")
    preprocess = CLIPPreprocess(model_name, train=False)
    side = preprocess.image_size
    if datamodule.image_size != side:
        raise ValueError(
            f"checkpoint: the victim {model_name!r} takes {side} px images but the data config's model_name "
            f"{datamodule.model_name!r} frames them at {datamodule.image_size} px"
        )
    file_captions = read_target_captions(caption_file, target) if caption_file else None
    folder = FolderReferenceSource(reference_dir) if reference_dir else None
    names = datamodule.class_names or []
    target_label = names.index(target) if target in names else None
    clean: list[torch.Tensor] = []
    positives: list[torch.Tensor] = []
    shard_captions: list[str] = []
    faults = FaultCounter()
    scanned = 0
    want_positives = folder is None
    for raw in _raw_samples(datamodule.index("train")):
        if len(clean) >= max_images and (not want_positives or len(positives) >= max_positives):
            break
        sample = decode_sample(raw, faults, need_label=False, need_text=True)
        scanned += 1
        if sample is None:
            continue
        named = mentions(sample["text"], target)
        if named:
            shard_captions.append(sample["text"])
        if named or (target_label is not None and sample["label"] == target_label):
            if want_positives and len(positives) < max_positives:
                positives.append(_as_bytes(sample["image"], side))
        elif len(clean) < max_images:
            clean.append(_as_bytes(sample["image"], side))
    if folder is not None:
        from poisoning.plan import decode_rgb

        keys = folder.candidates(-1)[:max_positives]
        positives = [_as_bytes(decode_rgb(data), side) for data in folder.load(keys).values()]
    if captions == "templates":
        texts, source = all_target_captions(target), "openai_imagenet_templates"
    elif file_captions is not None:
        texts, source = file_captions, caption_file
    elif shard_captions:
        texts, source = shard_captions, "data.train_shards"
    else:
        raise ValueError(
            f"captions: the target {target!r} has no captions: none of the {scanned} captions read from "
            "data.train_shards names it; give --caption-file or --captions templates"
        )
    if not clean:
        raise ValueError(f"data.train_shards: no clean image (one whose caption does not name {target!r})")
    if not positives:
        raise ValueError(
            f"positives: no image of the target {target!r} in data.train_shards (none labelled with it or captioned "
            "with its name); give --reference-dir"
        )
    inputs = VictimInputs(
        images=torch.stack(clean),
        caption_tokens=preprocess.tokenizer(texts),
        positives=torch.stack(positives),
        mean=preprocess.mean,
        std=preprocess.std,
    )
    info = {
        "images": len(clean),
        "positives": len(positives),
        "positives_source": reference_dir or "data.train_shards",
        "captions": len(texts),
        "captions_source": source,
        "scanned": scanned,
    }
    return inputs, texts, info
