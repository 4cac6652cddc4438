"""DepthPruneCallback: remove whole decoder blocks (ShortGPT, Shortened LLaMA) inside ``trainer.fit``.

When. In ``setup``, before ``configure_model`` wraps the model with LoRA and before the optimizer exists, like
the width callbacks. Its :class:`~lit_prune.pruning.depth.DepthSpec` is validated when the callback is built and
against the model (block indices, the count a ratio rounds to, at least one block left) before any forward pass.
It scores the blocks on the calibration texts (the datamodule's ``capture_texts(tokenizer)`` groups, the same
target/distractor sets width pruning captures on, or explicit texts), tokenized and batched by the capture
callbacks' one batcher (:func:`~lit_prune.data.batching.labelled_batches`: prompt + reference response, labels on the response), sharded over the ranks and summed
with ``trainer.strategy.reduce`` before any decision; then it removes the blocks
(:meth:`~lit_prune.pruning.depth.DepthPlan.apply`).

Width and depth together. Depth goes first: list this callback before ``ActivationCaptureCallback``,
``SelectivityPruneCallback`` and ``WeightSparsityCallback``. Those then capture, plan and mask the blocks that
remain (their layer ``i`` is the ``i``-th remaining block), so the width plan fits the exported model, and a
resumed run replays the depth plan before the width plan. The other order is refused before any capture
(:func:`lit_prune.callbacks._utils.check_depth_first`).

Resume. The plan travels in checkpoints under ``checkpoint["lit_prune"]["depth"]`` (beside the width plan's
``["plan"]``): this callback is its one writer and :func:`~lit_prune.pruning.depth.read_checkpoint_depth_plan`
its one reader. With ``trainer.ckpt_path`` set before ``fit`` (``python -m lit_prune fit --ckpt_path``),
``setup`` replays the stored plan without scoring and the checkpoint's weights load next.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks._utils import (
    rank_sum,
    check_sizes,
    Text,
    applied_plan,
    datamodule_texts,
    find_causal_lm,
    find_tokenizer,
    resume_checkpoint,
    text_pairs,
)
from lit_prune.callbacks.capture import ActivationCaptureCallback, check_output_path
from lit_prune.data.batching import labelled_batches
from lit_prune.io import atomic_write_text
from lit_prune.pruning.depth import (
    DEFAULT_DEPTH_CRITERION,
    DEPTH_KEY,
    DepthPlan,
    DepthSpec,
    make_depth_plan,
    read_checkpoint_depth_plan,
)
from lit_prune.pruning.plan import CHECKPOINT_KEY
from lit_prune.pruning.stats import model_fingerprint, prompt_set_hash

__all__ = ["DepthPruneCallback"]

log = logging.getLogger(__name__)


def _applied_depth_plan(pl_module: L.LightningModule) -> DepthPlan | None:
    """The depth plan already applied to the module (``pl_module.depth_plan``), if any."""
    return getattr(pl_module, "depth_plan", None)


class DepthPruneCallback(Callback):
    """Remove a number (or a parameter fraction) of decoder blocks, chosen by a depth criterion."""

    def __init__(
        self,
        num_blocks: int | None = None,
        ratio: float | None = None,
        blocks: Sequence[int] | None = None,
        criterion: str = DEFAULT_DEPTH_CRITERION,
        calibration: str = "target",
        keep_first: bool = True,
        keep_last: bool = True,
        capture: str = "response",
        target_prompts: Sequence[str] | None = None,
        distractor_prompts: Sequence[str] | None = None,
        target_responses: Sequence[str] | None = None,
        distractor_responses: Sequence[str] | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        plan_path: str | None = None,
        tokenizer=None,
    ) -> None:
        """
        Args:
            num_blocks: Decoder blocks to remove (>= 1). Give exactly one of ``num_blocks``, ``ratio``, ``blocks``.
            ratio: Fraction of the model's parameters to remove, in (0, 1), rounded to the nearest block count.
            blocks: Explicit indices of the blocks to remove (no criterion, no calibration pass).
            criterion: ``block_influence`` (ShortGPT, one forward pass; default), ``ppl`` (Shortened LLaMA, one
                pass per block) or ``taylor_block`` (Shortened LLaMA, a backward pass).
            calibration: Texts the criterion reads: ``target`` (default), ``distractor`` or ``both``.
            keep_first: Never remove the first block (default True, Shortened LLaMA's heuristic; see
                :class:`~lit_prune.pruning.depth.DepthSpec`).
            keep_last: Never remove the last block (default True).
            capture: ``response`` (prompt + reference response + EOS, labels on the response) or ``prompt``.
            target_prompts: Formatted target prompts (default: the datamodule's ``capture_texts(tokenizer)``).
            distractor_prompts: Formatted distractor prompts (default: from the datamodule).
            target_responses: Reference responses of ``target_prompts`` (same length).
            distractor_responses: Reference responses of ``distractor_prompts``.
            batch_size: Texts per forward pass.
            max_length: Texts are cut to this many tokens.
            plan_path: Also write the depth plan as JSON here.
            tokenizer: Tokenizer to use (default: ``pl_module.tokenizer``).

        Raises:
            ValueError: For none or several of ``num_blocks`` / ``ratio`` / ``blocks``; a count < 1 (negative
                included); a ratio outside (0, 1); repeated or negative block indices; an explicit block 0 (or,
                in ``setup``, the last block) while ``keep_first`` (``keep_last``) is true; an unknown
                ``criterion``, ``calibration`` or ``capture``; ``batch_size`` or ``max_length`` < 1; a text
                argument that is a string or empty; responses of another length; an unwritable ``plan_path``.
                Indices out of range, a ratio that rounds to zero blocks and removing every block fail in
                ``setup`` before any forward pass (they need the model).
        """
        super().__init__()
        self.spec = DepthSpec(num_blocks, ratio, None if blocks is None else list(blocks), criterion, calibration,
                              capture, keep_first, keep_last)
        self.texts = {"target": text_pairs("target", target_prompts, target_responses),
                      "distractor": text_pairs("distractor", distractor_prompts, distractor_responses)}
        check_sizes(batch_size=batch_size, max_length=max_length)
        self.batch_size, self.max_length = batch_size, max_length
        check_output_path("plan_path", plan_path)
        self.plan_path = plan_path
        self.tokenizer = tokenizer
        self.plan: DepthPlan | None = None
        self.truncated: dict[str, int] = {}

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("validate", "predict"):
            return
        self.prune(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The one writer; a top-level key, so a resumed run replays it in `setup`, before any weights load.
        if self.plan is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})[DEPTH_KEY] = self.plan.to_dict()

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)

    # ------------------------------------------------------------------ the work
    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> DepthPlan:
        """Remove the blocks once: replay the resume checkpoint's depth plan, or score and plan now.

        Raises:
            ValueError: If a width or sparsity callback comes before this one, the model arrived pruned, or the
                spec does not fit the model; all before any forward pass.
        """
        model = find_causal_lm(pl_module)
        if self.plan is not None and _applied_depth_plan(pl_module) is self.plan and self.plan.is_applied(model):
            return self.plan
        self._check_order(trainer)
        self._check_not_pruned(pl_module)
        checkpoint = resume_checkpoint(trainer)
        saved = None if checkpoint is None else read_checkpoint_depth_plan(checkpoint)
        if saved is not None:
            self._record(pl_module, saved)
            saved.apply(model)  # the checkpoint's weights load next
            rank_zero_info(f"resuming: replaying the checkpoint's depth plan ({saved.label}, blocks "
                           f"{saved.removed_blocks}) without scoring")
            plan = saved
        else:
            self.spec.check_model(model)  # indices, rounding, one block left: before any forward pass
            batches, provenance = ([], {}) if not self.spec.needs_data else self._calibration(trainer, pl_module)
            reduce = rank_sum(trainer)
            provenance.update(model=getattr(model.config, "_name_or_path", type(model).__name__),
                              model_fingerprint=model_fingerprint(model))
            plan = make_depth_plan(model, batches, self.spec, reduce=reduce, provenance=provenance)
            self._record(pl_module, plan)
            plan.apply(model)
        self.plan = plan
        if hasattr(pl_module, "set_depth_plan"):
            pl_module.set_depth_plan(plan)
        else:
            pl_module.depth_plan = plan
        if self.plan_path and trainer.is_global_zero:
            atomic_write_text(self.plan_path, json.dumps(plan.to_dict(), indent=1))
        rank_zero_info(f"depth-pruned {plan.label}: removed blocks {plan.removed_blocks} of "
                       f"{plan.original_num_layers} ({plan.param_ratio:.2%} of the parameters), "
                       f"{plan.num_layers} remain")
        return plan

    def check_checkpoint(self, checkpoint: dict) -> None:
        """After a checkpoint's weights loaded: its depth plan must be the one this run applied.

        Raises:
            ValueError: If they differ (the run was resumed by ``trainer.fit(ckpt_path=...)``, which ``setup``
                cannot see, and planned afresh).
        """
        saved = read_checkpoint_depth_plan(checkpoint)
        if saved is not None and self.plan is not None and saved.removed_blocks != self.plan.removed_blocks:
            raise ValueError(
                f"the checkpoint's depth plan ({saved.label}, blocks {saved.removed_blocks}) differs from the one this "
                f"run made ({self.plan.label}, blocks {self.plan.removed_blocks}); set `trainer.ckpt_path` before "
                "`trainer.fit` (or use `python -m lit_prune fit --ckpt_path`) so the stored plan is replayed"
            )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _record(pl_module: L.LightningModule, plan: DepthPlan) -> None:
        """Tell the module (before the blocks go) that its weights change, so it is evaluated against the dense
        model it came from."""
        if hasattr(pl_module, "record_modification"):
            pl_module.record_modification(plan.label)

    def _check_order(self, trainer: L.Trainer) -> None:
        from lit_prune.callbacks.prune import SelectivityPruneCallback
        from lit_prune.callbacks.sparsity import WeightSparsityCallback

        callbacks = list(trainer.callbacks)
        position = next((i for i, c in enumerate(callbacks) if c is self), len(callbacks))
        earlier = [type(c).__name__ for c in callbacks[:position]
                   if isinstance(c, (ActivationCaptureCallback, SelectivityPruneCallback, WeightSparsityCallback))]
        if earlier:
            raise ValueError(f"DepthPruneCallback comes after {sorted(set(earlier))} in `trainer.callbacks`: width "
                             "statistics, plans and masks must be made on the blocks that remain; list "
                             "DepthPruneCallback first")

    def _check_not_pruned(self, pl_module: L.LightningModule) -> None:
        source = getattr(pl_module, "model_name_or_path", None) or type(pl_module).__name__
        depth = _applied_depth_plan(pl_module)
        if depth is not None and depth is not self.plan:
            raise ValueError(f"model {source!r} is already depth-pruned ({depth.label}, blocks {depth.removed_blocks} "
                             "removed); remove the DepthPruneCallback for LoRA recovery, or start from the dense "
                             f"model {depth.provenance.get('model', '(the plan names no source model)')!r}")
        width = applied_plan(pl_module)
        if width is not None:
            raise ValueError(f"model {source!r} is already width-pruned ({width.label}, kept width "
                             f"{width.kept_width}): depth-prune the dense model, with DepthPruneCallback before the "
                             "width callbacks")

    def _texts(self, trainer: L.Trainer, tokenizer) -> dict[str, list[Text]]:
        texts = {g: self.texts[g] for g in self.spec.groups}
        if any(t is None for t in texts.values()):
            from_data = datamodule_texts(trainer, tokenizer) or {}
            texts = {g: list(from_data.get(g) or []) if t is None else t for g, t in texts.items()}
        empty = [g for g, t in texts.items() if not any(prompt.strip() for prompt, _ in t)]
        if empty:
            raise ValueError(f"DepthPruneCallback(calibration={self.spec.calibration!r}) has no {empty[0]} texts: pass "
                             f"`{empty[0]}_prompts` or use a datamodule with `capture_texts(tokenizer)`")
        return texts

    def _calibration(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list, dict]:
        started = time.perf_counter()
        tokenizer = find_tokenizer(pl_module, self.tokenizer)
        texts = self._texts(trainer, tokenizer)
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            rank, world = 0, 1
        batches, cut = [], {}
        for group, group_texts in texts.items():
            group_batches, cut[group] = labelled_batches(tokenizer, group_texts[rank::world], self.spec.capture,
                                                         self.max_length, self.batch_size)
            batches += group_batches
        device = trainer.strategy.root_device
        self.truncated = {g: int(trainer.strategy.reduce(torch.tensor(float(cut[g]), device=device), reduce_op="sum"))
                          for g in texts}
        for group, count in self.truncated.items():
            if count:
                rank_zero_warn(f"depth calibration: {count} of {len(texts[group])} {group} texts were longer than "
                               f"max_length={self.max_length} tokens and were cut")
        pl_module.to(device)
        capture = self.spec.capture
        provenance = {
            "calibration": self.spec.calibration, "capture": capture, "max_length": self.max_length,
            "world_size": world, "texts": {g: len(t) for g, t in texts.items()},
            "texts_hash": {g: prompt_set_hash(f"{p}\x01{r or ''}" if capture == "response" else p for p, r in t)
                           for g, t in texts.items()},
            "truncated": self.truncated,
            "tokenize_seconds": time.perf_counter() - started,
        }
        return batches, provenance
