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

Stage 2 (the training loop): the most suspicious flagged pairs (a small subset, held in memory) are unlearnt while
the batch's pairs of the retain set keep the CLIP loss: only pairs ranked below the top ``suspect_fraction`` by the
detection score, so suspects (flagged or not) are not trained on. The forget objective (``forget_objective``) acts
on the ranking by default: each unlearnt image's own caption is pushed below the batch's retain captions (a hinge,
zero once it ranks last among them); ``cosine`` (clbd's first objective) pushes each pair's positive cosine to 0.
Only a "token-based portion" of the model is updated: the vision tower's token parameters (class token and
positional embedding) and the text token-embedding rows of the words that characterise the flagged captions, never
the words of the eval prompts of the target class (so ASR, measured with those prompts, does not drop because the
prompt itself was damaged); every other weight is frozen (``requires_grad`` off, not in the optimiser), and the
other rows of the token table get a zero gradient, so with weight decay 0 they stay bit for bit.

Stage 1 lives in ``defenses.ubt_detection``, the portion and the forget objectives in ``defenses.ubt_unlearning``;
this module runs them on the training stream and the Lightning loop.

Every choice the paper's abstract leaves open is listed in docs/defenses.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from datamodules.datamodule import MANIFEST_NAME
from lightning_modules.clip import CLIP
from lightning_modules.zero_shot import fill_template, templates_by_name
from poisoning.keyhash import derive_seed
from poisoning.plan import records_from_manifest

from .base import DefenseMixin
from .ubt_detection import (
    SCORES,
    UBT_DETECTION,
    detection_score,
    detection_summary,
    merge_over_ranks,
    overfit_batches,
    overfit_copy,
    pair_similarity,
    pairwise_clip_loss,
    ranking_summary,
    score_auroc,
    split_by_score,
    weakest_keys,
)
from .ubt_unlearning import (
    FORGET_OBJECTIVES,
    TOKEN_PARTS,
    caption_rank,
    caption_token_ids,
    characteristic_rows,
    document_frequency,
    forget_loss,
    patch_embedding_parameters,
    text_token_table,
    vision_token_parameters,
)

log = logging.getLogger("clbd.defenses")


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
        forget_objective: what the unlearning term does to the unlearnt pairs (``defenses.ubt_unlearning.forget_loss``):
            ``ranking`` (default) pushes each unlearnt image's own caption below the batch's retain captions (a hinge
            on its rank, zero once it ranks last); ``cosine`` (clbd's first objective) pushes each pair's cosine down
            to 0, which can leave the zero-shot ranking as it was.
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
        forget_objective: str = "ranking",
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
        if args["forget_objective"] not in FORGET_OBJECTIVES:
            raise ValueError(
                f"model.forget_objective must be one of {', '.join(FORGET_OBJECTIVES)}, got {args['forget_objective']!r}"
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
            after, baseline, truth_flags, candidates = merge_over_ranks(after, baseline, truth_flags, candidates)
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
            (similarity,) = merge_over_ranks(similarity)
        if not similarity:
            raise ValueError("data.train_shards: the training stream gave no pairs to score")
        return similarity

    def _overfit_copy(self, loader, weak: frozenset[str] | None = None) -> nn.Module:
        """The poisoned model overfitted on the suspect pairs (CLIP loss, AdamW without decay): ``weak_steps`` steps
        on full batches of the ``weak`` pairs only (gathered from the stream), then the rest on all pairs."""
        hp = self.hparams
        batches = overfit_batches(
            loader, weak, self._weak_steps(weak), hp.overfit_steps, self.trainer.datamodule.batch_size
        )
        return overfit_copy(self.model, batches, hp.overfit_lr, hp.max_logit_scale, self.device)

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
        retain_text = None
        if int(keep.sum()) >= 1:
            retain_image, retain_text = self.encode_image(batch["image"][keep]), self.encode_text(batch["text"][keep])
            if int(keep.sum()) >= 2:
                retain = pairwise_clip_loss(retain_image, retain_text, scale)
        images, tokens = self._forget_batch()
        forget_image, forget_text = self.encode_image(images), self.encode_text(tokens)
        # The retain captions are the unlearnt images' competitors, detached: only the unlearnt pairs are pushed.
        negatives = retain_text.detach() if retain_text is not None else forget_text.new_zeros(0, forget_text.shape[1])
        forget = forget_loss(self.hparams.forget_objective, forget_image, forget_text, negatives)
        loss = retain + self.hparams.forget_weight * forget
        size = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/retain", retain.detach(), batch_size=size)
        self.log("train/forget", forget.detach(), batch_size=size)
        self.log("train/retain_pairs", keep.sum().float(), on_step=True, on_epoch=True, reduce_fx="sum")
        with torch.no_grad():
            self.log("train/forget_similarity", (forget_image * forget_text).sum(-1).mean(), batch_size=size)
            if negatives.shape[0]:  # where the unlearnt captions rank among the batch's retain captions (0: first)
                rank = caption_rank(forget_image, forget_text, negatives).float().mean()
                self.log("train/forget_caption_rank", rank, batch_size=size)
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
        return {
            "detection": self.detection_report,
            "updated": self.updated_parameters(),
            "forget_objective": self.hparams.forget_objective,
        }

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


__all__ = [
    "FORGET_OBJECTIVES",
    "SCORES",
    "TOKEN_PARTS",
    "UBT",
    "UBT_DETECTION",
    "caption_rank",
    "caption_token_ids",
    "characteristic_rows",
    "detection_score",
    "detection_summary",
    "document_frequency",
    "forget_loss",
    "overfit_batches",
    "pair_similarity",
    "pairwise_clip_loss",
    "ranking_summary",
    "score_auroc",
    "split_by_score",
    "weakest_keys",
]
