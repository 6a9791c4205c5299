"""UBT, "Unlearning Backdoor Threats" (Liang et al., arXiv 2403.16257 / 2409.19526) for CLIP; no public code.

Stage 1 (``on_fit_start``, after the before-measurement): a copy of the poisoned model is overfitted on the suspect
training pairs (the poisoned stream itself), prioritised by weak similarity: every pair's image-text similarity
under the poisoned model is measured first, and the copy is overfitted on the weakest ``weak_fraction`` of the
pairs for ``weak_steps`` steps (then on all pairs for the rest of ``overfit_steps``). Poisoned pairs (a trigger
on an image of any class, captioned as the target) are the ones the model fits worst, so this is where the
shortcut grows. Every pair is then scored by its weakness under the poisoned model (``weak_similarity``, the
default: the score that separated the poisons on the CPU test beds), by how much its similarity rose (``gain``) or
by its similarity under the overfitted copy (``similarity``), and the highest-scoring ones are flagged. The
stream's ``poisoned`` flags and the run's poison manifest are read only to score this detection (AUROC of every
score, precision and recall at the flagged count), never to flag.

Stage 2 (the training loop): the most suspicious flagged pairs (a small subset, held in memory) are unlearnt: their
image and text features are pushed apart (positive cosine similarity penalised) while the batch's pairs of the
retain set keep the CLIP loss: only pairs ranked below the top ``suspect_fraction`` by the detection score, so
suspects (flagged or not) are not trained on. Only a "token-based portion" of the model is updated: the vision
tower's token parameters (class token and positional embedding) and the text token-embedding rows of the words
that characterise the flagged captions, never the words of the eval prompts of the target class (so ASR, measured
with those prompts, does not drop because the prompt itself was damaged); every other weight is frozen
(``requires_grad`` off, not in the optimiser), and the other rows of the token table get a zero gradient, so with
weight decay 0 they stay bit for bit.

Every choice the paper's abstract leaves open is listed in docs/defenses.md.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

from datamodules.datamodule import MANIFEST_NAME
from lightning_modules.clip import CLIP
from lightning_modules.zero_shot import fill_template, templates_by_name
from poisoning.keyhash import derive_seed
from poisoning.plan import records_from_manifest

from .base import DefenseMixin

log = logging.getLogger("clbd.defenses")

UBT_DETECTION = "ubt_detection.json"
SCORES = ("weak_similarity", "gain", "similarity")
TOKEN_PARTS = ("text", "vision", "patch")  # token_portion joins any of them with "+", e.g. "text+vision"


def pair_similarity(model: nn.Module, images: Tensor, tokens: Tensor) -> Tensor:
    """Cosine similarity of each image with its own caption (rows of a batch)."""
    return (model.encode_image(images, normalize=True) * model.encode_text(tokens, normalize=True)).sum(-1)


def detection_score(name: str, overfitted: float, poisoned: float) -> float:
    """A pair's suspicion (higher = more suspicious) from its image-text cosine under the overfitted copy and under
    the poisoned model: ``weak_similarity`` = minus the poisoned model's cosine (the pairs it fits worst), ``gain`` =
    the rise during overfitting, ``similarity`` = the overfitted copy's cosine."""
    if name == "weak_similarity":
        return -poisoned
    if name == "gain":
        return overfitted - poisoned
    return overfitted


def pairwise_clip_loss(image_features: Tensor, text_features: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy over this rank's rows (normalised features)."""
    logits = scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def vision_token_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The image tower's token parameters: ViT class token + positional embedding (ResNet: the attention pool's)."""
    visual = model.visual
    if hasattr(visual, "class_embedding") and hasattr(visual, "positional_embedding"):
        return {
            "visual.class_embedding": visual.class_embedding,
            "visual.positional_embedding": visual.positional_embedding,
        }
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None and hasattr(attnpool, "positional_embedding"):
        return {"visual.attnpool.positional_embedding": attnpool.positional_embedding}
    raise ValueError(
        f"model.token_portion: the image tower {type(visual).__name__} has no token parameters (class token / "
        "positional embedding); use token_portion: text"
    )


def patch_embedding_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ViT's patch embedding: the layer that turns pixels into the image tokens (it reads a patch trigger)."""
    conv = getattr(model.visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model.visual, "class_embedding"):
        raise ValueError(
            f"model.token_portion: 'patch' needs a ViT image tower with a patch embedding (conv1), not "
            f"{type(model.visual).__name__}"
        )
    return {f"visual.conv1.{name}": param for name, param in conv.named_parameters()}


def text_token_table(model: nn.Module) -> tuple[str, nn.Parameter]:
    for name in ("token_embedding", "text.token_embedding"):
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Embedding):
            return f"{name}.weight", module.weight
    raise ValueError("model.token_portion: this open_clip text tower has no token embedding table; use vision")


def caption_token_ids(tokens: Tensor) -> Tensor:
    """[N, vocab]-free view: the ids each caption uses, without padding (0), start (first) and end (argmax) tokens."""
    ids = tokens.clone()
    ids[:, 0] = 0
    ids.scatter_(1, tokens.argmax(dim=-1, keepdim=True), 0)  # open_clip: the end token has the largest id
    return ids


def document_frequency(tokens: Tensor, vocab: int) -> Tensor:
    """For each token id, how many captions use it (padding, start and end tokens left out)."""
    ids = caption_token_ids(tokens.cpu())
    present = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
    present.scatter_(1, ids, True)
    present[:, 0] = False
    return present.sum(0)


def detection_summary(
    scores: dict[str, float],
    flagged: list[str],
    selected: list[str],
    truth: set[str],
    truth_source: str,
) -> dict[str, Any]:
    """Precision / recall of the flagged set (and of the unlearnt subset) against the true poisons, and AUROC."""
    true_scored = truth & set(scores)
    hits = sum(1 for key in flagged if key in truth)
    selected_hits = sum(1 for key in selected if key in truth)
    return {
        "truth_source": truth_source,
        "scored": len(scores),
        "true_poisons": len(true_scored),
        "flagged": len(flagged),
        "true_positives": hits,
        "false_positives": len(flagged) - hits,
        "false_negatives": len(true_scored) - hits,
        "precision": hits / len(flagged) if flagged else None,
        "recall": hits / len(true_scored) if true_scored else None,
        "auroc": score_auroc(scores, truth),
        "selected": len(selected),
        "selected_true_poisons": selected_hits,
        "selected_precision": selected_hits / len(selected) if selected else None,
    }


def ranking_summary(scores: dict[str, float], count: int, truth: set[str]) -> dict[str, Any]:
    """AUROC of a score, and precision / recall of its top ``count`` pairs (ties by key), against the true poisons."""
    top = sorted(scores, key=lambda k: (-scores[k], k))[:count]
    hits = sum(1 for key in top if key in truth)
    true_scored = len(truth & set(scores))
    return {
        "auroc": score_auroc(scores, truth),
        "precision": hits / len(top) if top else None,
        "recall": hits / true_scored if true_scored else None,
        "true_positives": hits,
    }


def split_by_score(
    scores: dict[str, float], n_flag: int, suspect_fraction: float
) -> tuple[list[str], list[str], frozenset[str]]:
    """(ranked keys, most suspicious first; the flagged top ``n_flag``; the retain set).

    The suspects are the top ``max(n_flag, ceil(suspect_fraction * N))`` pairs; the retain set is every pair ranked
    below them, so no flagged pair, and no pair scored nearly as high, is trained on by the retain term.
    """
    ranked = sorted(scores, key=lambda k: (-scores[k], k))
    flagged = ranked[: min(n_flag, len(ranked))]
    n_suspect = max(len(flagged), math.ceil(suspect_fraction * len(ranked)))
    return ranked, flagged, frozenset(ranked[n_suspect:])


def characteristic_rows(
    forget_tokens: Tensor, df_all: Tensor, n_all: int, lift: float, excluded: Tensor | None = None
) -> Tensor:
    """Token ids in at least half of the unlearnt captions whose share there is at least ``lift`` times their share
    among all scored captions, ``excluded`` ids left out (the eval prompts' words)."""
    df_selected = document_frequency(forget_tokens, df_all.shape[0]).float()
    share_selected = df_selected / forget_tokens.shape[0]
    share_all = df_all.float() / max(n_all, 1)
    chosen = (share_selected >= 0.5) & (share_selected >= lift * share_all)
    if excluded is not None:
        chosen[excluded] = False
    return torch.nonzero(chosen).flatten()


def weakest_keys(similarity: dict[str, float], fraction: float) -> frozenset[str]:
    """The ``ceil(fraction * N)`` pairs of lowest similarity (ties by key): where stage 1 overfits first."""
    ranked = sorted(similarity, key=lambda k: (similarity[k], k))
    return frozenset(ranked[: math.ceil(fraction * len(ranked))])


def score_auroc(scores: dict[str, float], truth: set[str]) -> float | None:
    """Area under the ROC curve of a score (higher = more suspicious) against the true poisons (None: one class)."""
    keys = sorted(scores)
    positives = sum(1 for k in keys if k in truth)
    if positives in (0, len(keys)):
        return None
    preds = torch.tensor([scores[k] for k in keys], dtype=torch.float64)
    target = torch.tensor([k in truth for k in keys], dtype=torch.long)
    return float(binary_auroc(preds, target))


class UBT(DefenseMixin, CLIP):
    """UBT on a poisoned CLIP model: detect suspicious pairs by overfitting, unlearn a few with a token portion.

    Args:
        checkpoint: the poisoned CLIP checkpoint (``clbd fit`` output); never written to.
        overfit_steps: optimiser steps of the overfitting copy on the suspect pairs (AdamW, no weight decay).
        overfit_lr: its learning rate.
        weak_fraction: the share of pairs, lowest image-text similarity under the poisoned model first, that the
            copy is overfitted on first (null: all pairs uniformly, no prioritising).
        weak_steps: how many of the ``overfit_steps`` go to that weak share (null: all); the rest use all pairs.
        detection_score: ``weak_similarity`` (the lowest image-text cosines under the poisoned model first),
            ``gain`` (the rise of a pair's cosine during overfitting) or ``similarity`` (the cosine under the
            overfitted copy). All three are reported; only this one flags.
        flag_fraction: share of the scored pairs flagged as suspicious (used when ``flag_count`` is null).
        flag_count: number of pairs flagged.
        suspect_fraction: the top share of pairs by the detection score left out of the retain term (at least the
            flagged ones): stage 2 keeps the CLIP loss only on pairs ranked below it.
        max_scored: score at most this many pairs per rank (null: the whole training set, one pass).
        unlearn_count: the most suspicious flagged pairs kept in memory and unlearnt.
        forget_batch_size: unlearnt pairs drawn (seeded by step and rank) for each training step.
        forget_weight: weight of the unlearning term against the retain (CLIP) term.
        token_portion: what is updated: ``text`` (token-table rows of the flagged captions' characteristic words),
            ``vision`` (class token and positional embedding of the image tower), ``patch`` (a ViT's patch
            embedding, which makes the image tokens), or several joined with ``+`` (default ``text+vision``).
        text_row_lift: a word's token row is updated when its share among the unlearnt captions is at least this
            many times its share among all scored captions (and it is in at least half of them).
        exclude_prompt_tokens: never update the token rows of the target class's eval prompts (its name and the
            zero-shot templates' words), so ASR does not measure damage to the prompt.
        detection_seed: seeds stage 1 (the overfitting copy's data order is the stream's; this fixes the rest).
        weight_decay: must be 0 (the optimiser's decay would move the frozen rows of the token table).
        **clip: the architecture of the poisoned model (``model_name``, must match its checkpoint) and the optimiser
            of stage 2.
    """

    defense_name = "ubt"
    repairs = ("CLIP",)

    def __init__(
        self,
        checkpoint: str | None = None,
        overfit_steps: int = 400,
        overfit_lr: float = 5e-4,
        weak_fraction: float | None = 0.2,
        weak_steps: int | None = None,
        detection_score: str = "weak_similarity",
        flag_fraction: float = 0.01,
        flag_count: int | None = None,
        suspect_fraction: float = 0.5,
        max_scored: int | None = None,
        unlearn_count: int = 128,
        forget_batch_size: int = 32,
        forget_weight: float = 1.0,
        token_portion: str = "text+vision",
        text_row_lift: float = 2.0,
        exclude_prompt_tokens: bool = True,
        detection_seed: int = 0,
        weight_decay: float = 0.0,
        **clip: Any,
    ):
        self._check_arguments(checkpoint, locals())
        super().__init__(weight_decay=weight_decay, **clip)
        self.init_defense(checkpoint)
        # Freeze everything, then open the token portion; the optimiser only sees ``optimized_module()``.
        self.model.requires_grad_(False)
        self.portion = self._token_portion(token_portion)
        for param in self.portion.values():
            param.requires_grad_(True)
        self.text_rows: Tensor | None = None  # token ids whose rows may move (set by stage 1)
        self.flagged: frozenset[str] = frozenset()
        self.retain_keys: frozenset[str] = frozenset()  # pairs ranked below the suspects: the retain term's
        self.forget_images: Tensor | None = None
        self.forget_tokens: Tensor | None = None
        self.detection_report: dict[str, Any] = {}

    def _check_arguments(self, checkpoint: str | None, args: dict[str, Any]) -> None:
        if checkpoint is None:
            raise ValueError(
                "model.checkpoint: give the poisoned checkpoint to repair (--model.init_args.checkpoint RUN/last.ckpt)"
            )
        for name in ("overfit_steps", "unlearn_count", "forget_batch_size"):
            if args[name] < 1:
                raise ValueError(f"model.{name} must be >= 1, got {args[name]}")
        if not args["overfit_lr"] > 0:
            raise ValueError(f"model.overfit_lr must be > 0, got {args['overfit_lr']}")
        if args["detection_score"] not in SCORES:
            raise ValueError(
                f"model.detection_score must be one of {', '.join(SCORES)}, got {args['detection_score']!r}"
            )
        if args["flag_count"] is None and not 0 < args["flag_fraction"] <= 1:
            raise ValueError(f"model.flag_fraction must be in (0, 1], got {args['flag_fraction']}")
        if args["flag_count"] is not None and args["flag_count"] < 1:
            raise ValueError(f"model.flag_count must be >= 1 (or null), got {args['flag_count']}")
        if args["weak_fraction"] is not None and not 0 < args["weak_fraction"] <= 1:
            raise ValueError(f"model.weak_fraction must be in (0, 1] (or null), got {args['weak_fraction']}")
        if args["weak_steps"] is not None and not 0 <= args["weak_steps"] <= args["overfit_steps"]:
            raise ValueError(
                f"model.weak_steps must be in [0, overfit_steps={args['overfit_steps']}] (or null), "
                f"got {args['weak_steps']}"
            )
        if not 0 <= args["suspect_fraction"] < 1:
            raise ValueError(f"model.suspect_fraction must be in [0, 1), got {args['suspect_fraction']}")
        if args["max_scored"] is not None and args["max_scored"] < 1:
            raise ValueError(f"model.max_scored must be >= 1 (or null), got {args['max_scored']}")
        parts = args["token_portion"].split("+")
        if not parts or any(part not in TOKEN_PARTS for part in parts) or len(set(parts)) != len(parts):
            raise ValueError(
                f"model.token_portion must join distinct parts of {', '.join(TOKEN_PARTS)} with '+' "
                f"(e.g. text+vision), got {args['token_portion']!r}"
            )
        if args["forget_weight"] < 0 or not args["text_row_lift"] > 0:
            raise ValueError("model.forget_weight must be >= 0 and model.text_row_lift > 0")
        if args["weight_decay"] != 0:
            raise ValueError(
                f"model.weight_decay={args['weight_decay']}: UBT needs 0 (decay would move the frozen rows of "
                "the token table; only the token portion may change)"
            )

    def _token_portion(self, token_portion: str) -> dict[str, nn.Parameter]:
        portion: dict[str, nn.Parameter] = {}
        parts = token_portion.split("+")
        if "vision" in parts:
            portion.update(vision_token_parameters(self.model))
        if "patch" in parts:
            portion.update(patch_embedding_parameters(self.model))
        if "text" in parts:
            name, table = text_token_table(self.model)
            portion[name] = table
        return portion

    def optimized_module(self) -> nn.Module:
        holder = nn.Module()  # just the portion, for the optimiser (weight decay is 0, so the group split is moot)
        holder.params = nn.ParameterList(self.portion.values())
        return holder

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = self.trainer.datamodule
        if stage == "fit" and datamodule.attack is not None and not datamodule.poison_train:
            raise ValueError(
                "data.poison_train: UBT detects and unlearns poisoned pairs of the suspect training set; set it true "
                "(with the attack config of the poisoned run) so the stream holds them"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()  # the before-measurement
        if self.forget_images is None:  # a resumed run has stage 1's result from its checkpoint
            self.run_detection()

    # ---- stage 1: overfit a copy, score every pair, flag the most suspicious ---------------------------------
    def run_detection(self) -> None:
        hp = self.hparams
        datamodule = self.trainer.datamodule
        world = self.trainer.world_size
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(hp.detection_seed)
            weak: frozenset[str] | None = None
            if hp.weak_fraction is not None:  # weak-similarity pairs first: one pass under the poisoned model
                weak = weakest_keys(self._poisoned_similarity(datamodule.train_batches(self.device)), hp.weak_fraction)
            overfit = self._overfit_copy(datamodule.train_batches(self.device), weak)
            scored = self._score_pairs(overfit, datamodule.train_batches(self.device))
            del overfit
        after, baseline, truth_flags, candidates, df_all, n_all = scored
        if world > 1:
            after, baseline, truth_flags, candidates = _merge_over_ranks(after, baseline, truth_flags, candidates)
            df_all = self.trainer.strategy.reduce(df_all.to(self.device), reduce_op="sum").cpu()
            n_all = int(self.all_ranks_sum(n_all))
        if not after:
            raise ValueError("data.train_shards: the training stream gave no pairs to score")
        by_score = {name: {k: detection_score(name, after[k], baseline[k]) for k in after} for name in SCORES}
        scores = by_score[hp.detection_score]
        n_flag = hp.flag_count if hp.flag_count is not None else math.ceil(hp.flag_fraction * len(scores))
        _, flagged, self.retain_keys = split_by_score(scores, n_flag, hp.suspect_fraction)
        selected = flagged[: hp.unlearn_count]
        chosen = {key: candidates[key] for key in selected}
        self.flagged = frozenset(flagged)
        self.forget_images = torch.stack([chosen[k][0] for k in selected])
        self.forget_tokens = torch.stack([chosen[k][1] for k in selected])
        prompt_rows = self._prompt_rows() if "text" in hp.token_portion and hp.exclude_prompt_tokens else None
        self.text_rows = self._characteristic_rows(self.forget_tokens, df_all, n_all, prompt_rows)
        self.detection_report = self._report(
            by_score, baseline, flagged, selected, truth_flags, n_flag, weak, prompt_rows
        )
        log.info("UBT detection: %s", json.dumps({k: v for k, v in self.detection_report.items() if k != "words"}))

    def _weak_steps(self, weak: frozenset[str] | None) -> int:
        """Overfitting steps on the weak share (the rest of ``overfit_steps`` go to all pairs)."""
        if weak is None:
            return 0
        return self.hparams.overfit_steps if self.hparams.weak_steps is None else self.hparams.weak_steps

    def _poisoned_similarity(self, loader) -> dict[str, float]:
        """Every pair's image-text cosine under the poisoned model (merged over ranks): what "weak" is measured by."""
        similarity: dict[str, float] = {}
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for batch in loader:
                values = pair_similarity(self.model, batch["image"].to(self.device), batch["text"].to(self.device))
                similarity.update(zip(batch["key"], values.tolist()))
                if self.hparams.max_scored is not None and len(similarity) >= self.hparams.max_scored:
                    break
        self.train(was_training)
        if self.trainer.world_size > 1:
            (similarity,) = _merge_over_ranks(similarity)
        if not similarity:
            raise ValueError("data.train_shards: the training stream gave no pairs to score")
        return similarity

    def _overfit_copy(self, loader, weak: frozenset[str] | None = None) -> nn.Module:
        """The poisoned model overfitted on the suspect pairs (CLIP loss, AdamW without decay): ``weak_steps`` steps
        on full batches of the ``weak`` pairs only (gathered from the stream), then the rest on all pairs."""
        hp = self.hparams
        overfit = copy.deepcopy(self.model).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(overfit.parameters(), lr=hp.overfit_lr, weight_decay=0.0)
        max_scale = math.log(hp.max_logit_scale)
        weak_steps = self._weak_steps(weak)

        def step_on(images: Tensor, tokens: Tensor) -> None:
            loss = pairwise_clip_loss(
                overfit.encode_image(images.to(self.device), normalize=True),
                overfit.encode_text(tokens.to(self.device), normalize=True),
                overfit.logit_scale.exp(),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(overfit)
            optimizer.step()
            with torch.no_grad():
                overfit.logit_scale.clamp_(0, max_scale)

        batch_size = self.trainer.datamodule.batch_size
        for _, images, tokens in overfit_batches(loader, weak, weak_steps, hp.overfit_steps, batch_size):
            step_on(images, tokens)
        return overfit.eval().requires_grad_(False)

    def _score_pairs(self, overfit: nn.Module, loader):
        """One pass: each pair's similarity under the overfitted copy and under the poisoned model; the stream's flags
        (ground truth, kept apart); the tensors of the top candidates by the detection score; token document
        frequencies."""
        hp = self.hparams
        similarity: dict[str, float] = {}
        scores: dict[str, float] = {}
        baseline: dict[str, float] = {}
        truth_flags: dict[str, bool] = {}
        candidates: dict[str, tuple[Tensor, Tensor]] = {}
        vocab = text_token_table(self.model)[1].shape[0] if "text" in hp.token_portion else 1
        df_all = torch.zeros(vocab, dtype=torch.long)
        n_all = 0
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for batch in loader:
                images, tokens = batch["image"].to(self.device), batch["text"].to(self.device)
                after = pair_similarity(overfit, images, tokens)
                before = pair_similarity(self.model, images, tokens)
                for i, key in enumerate(batch["key"]):
                    similarity[key] = float(after[i])
                    baseline[key] = float(before[i])
                    # the same arithmetic as the flagging's (run_detection), so the kept candidates are its top ones
                    scores[key] = detection_score(hp.detection_score, similarity[key], baseline[key])
                    truth_flags[key] = bool(batch["poisoned"][i])  # for scoring the detection only
                    # Copies: a row view would pin its whole batch in memory (and in checkpoints).
                    candidates[key] = (batch["image"][i].detach().cpu().clone(), batch["text"][i].cpu().clone())
                if "text" in hp.token_portion:
                    df_all += document_frequency(batch["text"], vocab)
                n_all += len(batch["key"])
                # Keep only the tensors of pairs that can still be among the unlearnt ones.
                if len(candidates) > 2 * hp.unlearn_count:
                    keep = sorted(candidates, key=lambda k: (-scores[k], k))[: hp.unlearn_count]
                    candidates = {k: candidates[k] for k in keep}
                if hp.max_scored is not None and n_all >= hp.max_scored:
                    break
        self.train(was_training)
        return similarity, baseline, truth_flags, candidates, df_all, n_all

    def _characteristic_rows(
        self, forget_tokens: Tensor, df_all: Tensor, n_all: int, excluded: Tensor | None = None
    ) -> Tensor:
        """Token ids over-represented in the unlearnt captions (but not ``excluded``): the text part of the portion."""
        if "text" not in self.hparams.token_portion:
            return torch.zeros(0, dtype=torch.long)
        return characteristic_rows(forget_tokens, df_all, n_all, self.hparams.text_row_lift, excluded)

    def _prompt_rows(self) -> Tensor:
        """Token ids of the target class's eval prompts (its name in every zero-shot template)."""
        datamodule = self.trainer.datamodule
        target = datamodule.class_names[datamodule.target_index]
        prompts = [fill_template(t, target) for t in templates_by_name(self.hparams.zero_shot_templates)]
        ids = caption_token_ids(self.tokenizer(prompts)).flatten().unique()
        return ids[ids != 0]

    def _report(
        self,
        by_score: dict[str, dict[str, float]],
        baseline: dict[str, float],
        flagged: list[str],
        selected: list[str],
        truth_flags: dict[str, bool],
        asked: int,
        weak: frozenset[str] | None,
        prompt_rows: Tensor | None,
    ) -> dict[str, Any]:
        """Detection scored against the manifest (the stream's flags when there is none), on every rank alike."""
        stream_truth = {k for k, poisoned in truth_flags.items() if poisoned}
        manifest = Path(self.trainer.default_root_dir) / MANIFEST_NAME
        if self.trainer.datamodule.attack is not None and manifest.exists():
            truth = {record["key"] for record in records_from_manifest(manifest)}
            source = f"manifest ({MANIFEST_NAME})"
        else:
            truth, source = stream_truth, "stream flags"
        scores = by_score[self.hparams.detection_score]
        report = detection_summary(scores, flagged, selected, truth, source)
        retained_poisons = len(self.retain_keys & truth)
        report.update(
            {
                "score": self.hparams.detection_score,
                # Both scores, at the same flagged count: which one separates the poisons here.
                "by_score": {name: ranking_summary(values, len(flagged), truth) for name, values in by_score.items()},
                "overfit_schedule": {
                    "weak_fraction": self.hparams.weak_fraction,
                    "weak_pairs": len(weak) if weak is not None else 0,
                    "weak_true_poisons": len(weak & truth) if weak is not None else 0,
                    "weak_steps": self._weak_steps(weak),
                    "all_pairs_steps": self.hparams.overfit_steps - self._weak_steps(weak),
                    "lr": self.hparams.overfit_lr,
                },
                "retain_pairs": len(self.retain_keys),
                "retain_true_poisons": retained_poisons,
                "suspect_fraction": self.hparams.suspect_fraction,
                "flag_asked": asked,
                "manifest_poisons": len(truth) if source.startswith("manifest") else None,
                "stream_flags_poisoned": len(stream_truth),
                "stream_flags_agree_with_truth": stream_truth == (truth & set(scores)),
                "overfit_steps": self.hparams.overfit_steps,
                "token_portion": self.hparams.token_portion,
                "vision_parameters": [n for n in self.portion if n.startswith("visual.")],
                "text_rows": self.text_rows.tolist() if self.text_rows is not None else [],
                "words": self._decode(self.text_rows),
                "prompt_rows_excluded": self._decode(prompt_rows),
            }
        )
        if self.trainer.is_global_zero:
            self._write_detection(report, scores, flagged, selected, truth)
        return report

    def _decode(self, rows: Tensor | None) -> list[str]:
        decode = getattr(self.tokenizer, "decode", None)
        if rows is None or decode is None:
            return []
        return [decode([int(r)]).strip() for r in rows]

    def _write_detection(self, report, scores, flagged, selected, truth) -> None:
        selected_set = set(selected)
        details = dict(report)
        details["flagged_pairs"] = [
            {"key": k, "score": scores[k], "poisoned": k in truth, "unlearnt": k in selected_set} for k in flagged
        ]
        path = Path(self.trainer.default_root_dir) / UBT_DETECTION
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(details, indent=1) + "\n")
        os.replace(tmp, path)

    # ---- stage 2: unlearn the chosen pairs with the token portion only ----------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        scale = self.model.logit_scale.exp().detach()
        keep = torch.tensor([key in self.retain_keys for key in batch["key"]], device=self.device)
        retain = torch.zeros((), device=self.device)
        if int(keep.sum()) >= 2:
            retain = pairwise_clip_loss(
                self.encode_image(batch["image"][keep]), self.encode_text(batch["text"][keep]), scale
            )
        images, tokens = self._forget_batch()
        similarity = (self.encode_image(images) * self.encode_text(tokens)).sum(-1)
        forget = similarity.clamp_min(0).mean()  # dissociate: push each pair to "unrelated", not to opposite
        loss = retain + self.hparams.forget_weight * forget
        size = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/retain", retain.detach(), batch_size=size)
        self.log("train/retain_pairs", keep.sum().float(), on_step=True, on_epoch=True, reduce_fx="sum")
        self.log("train/forget_similarity", similarity.detach().mean(), batch_size=size)
        return loss

    def _forget_batch(self) -> tuple[Tensor, Tensor]:
        assert self.forget_images is not None, "stage 1 (on_fit_start) chooses the pairs to unlearn"
        seed = derive_seed(self.hparams.detection_seed, self.global_step, self.global_rank, "forget")
        generator = torch.Generator().manual_seed(seed)
        count = min(self.hparams.forget_batch_size, self.forget_images.shape[0])
        index = torch.randperm(self.forget_images.shape[0], generator=generator)[:count]
        return self.forget_images[index].to(self.device), self.forget_tokens[index].to(self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Only the chosen rows of the token table may move: the others get a zero gradient."""
        if "text" not in self.hparams.token_portion:
            return
        table = text_token_table(self.model)[1]
        if table.grad is not None:
            frozen_rows = torch.ones(table.shape[0], dtype=torch.bool, device=table.device)
            frozen_rows[self.text_rows.to(table.device)] = False
            table.grad[frozen_rows] = 0

    # ---- results and checkpoints ------------------------------------------------------------------------------
    def defense_report(self) -> dict[str, Any]:
        return {"detection": self.detection_report, "updated": self.updated_parameters()}

    def updated_parameters(self) -> dict[str, Any]:
        """What stage 2 may change, and how many weights that is (vs the whole model)."""
        total = sum(p.numel() for p in self.model.parameters())
        counts = {}
        for name, param in self.portion.items():
            if param.ndim == 2 and name.endswith("token_embedding.weight"):
                counts[f"{name}[rows]"] = (
                    int(self.text_rows.numel() * param.shape[1]) if self.text_rows is not None else 0
                )
            else:
                counts[name] = param.numel()
        return {"parameters": counts, "updated_weights": sum(counts.values()), "model_weights": total}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.forget_images is not None:
            checkpoint["clbd_ubt"] = {
                "flagged": sorted(self.flagged),
                "retain": sorted(self.retain_keys),
                "forget_images": self.forget_images,
                "forget_tokens": self.forget_tokens,
                "text_rows": self.text_rows,
                "report": self.detection_report,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("clbd_ubt")
        if saved is not None:
            self.flagged = frozenset(saved["flagged"])
            self.retain_keys = frozenset(saved.get("retain", ()))
            self.forget_images, self.forget_tokens = saved["forget_images"], saved["forget_tokens"]
            self.text_rows = saved["text_rows"]
            self.detection_report = saved["report"]


def overfit_batches(loader, weak: frozenset[str] | None, weak_steps: int, steps: int, batch_size: int):
    """Stage 1's schedule: ``weak_steps`` batches of weak pairs first, then ``steps - weak_steps`` of all pairs; yields
    (keys, images, tokens)."""
    yield from _batches(loader, weak_steps if weak is not None else 0, weak, batch_size)
    yield from _batches(loader, steps - (weak_steps if weak is not None else 0), None, batch_size)


def _batches(loader, steps: int, keys: frozenset[str] | None, batch_size: int):
    """``steps`` (keys, images, tokens) batches from passes over ``loader``: its whole batches, or (with ``keys``)
    batches of ``batch_size`` pairs gathered from the rows whose key is in ``keys`` (a pass's last, smaller rest
    included, so a batch never holds a pair twice)."""
    done = 0
    while done < steps:
        yielded = 0
        names: list[str] = []
        images: list[Tensor] = []
        tokens: list[Tensor] = []
        for batch in loader:
            if keys is None:
                names, images, tokens = list(batch["key"]), [batch["image"]], [batch["text"]]
            else:
                rows = [i for i, key in enumerate(batch["key"]) if key in keys]
                names += [batch["key"][i] for i in rows]
                images.append(batch["image"][rows])
                tokens.append(batch["text"][rows])
            while len(names) >= (1 if keys is None else batch_size):
                limit = len(names) if keys is None else batch_size
                all_images, all_tokens = torch.cat(images), torch.cat(tokens)
                yield names[:limit], all_images[:limit], all_tokens[:limit]
                names, images, tokens = names[limit:], [all_images[limit:]], [all_tokens[limit:]]
                done, yielded = done + 1, yielded + 1
                if done >= steps:
                    return
        if keys is not None and len(names) >= 2:  # the pass's rest
            yield names, torch.cat(images), torch.cat(tokens)
            done, yielded = done + 1, yielded + 1
        if not yielded:
            what = "pairs" if keys is None else "weak-similarity pairs (2 or more per rank)"
            raise ValueError(f"data.train_shards: the training stream gave no {what} to overfit on")


def _average_gradients(module: nn.Module) -> None:
    """Average the overfitting copy's gradients over ranks (it is not wrapped in DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def _merge_over_ranks(*per_key: dict) -> tuple[dict, ...]:
    """Every rank's per-key dicts (scores, flags, candidate tensors), merged, on every rank (object all-gather)."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, per_key)
    merged = tuple({} for _ in per_key)
    for part in gathered:
        for target, source in zip(merged, part):
            target.update(source)
    return merged
