"""SelectivityPruneCallback: plan the kept width with any criterion and physically slice the MLPs.

Runs in ``setup`` after :class:`ActivationCaptureCallback` has statistics and before ``configure_model``
(LoRA) and the optimizer. Its :class:`~lit_prune.pruning.engine.PruneSpec` is validated when the callback is
built, and against the model by the capture callback before any forward pass. When the run resumes from a
checkpoint that holds a plan, it replays that plan instead of capturing (the checkpoint's weights, re-fitted
ones included, load right after), whichever way the checkpoint was named: ``trainer.ckpt_path = path``, or
``python -m lit_prune fit --ckpt_path <path|last>`` (``LitPruneTrainer.fit`` resolves the name first).

The plan travels in checkpoints under ``checkpoint["lit_prune"]["plan"]``: this callback is its one writer and
:func:`lit_prune.pruning.plan.read_checkpoint_plan` its one reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks._utils import (
    applied_plan,
    check_not_pruned_elsewhere,
    find_causal_lm,
    resume_plan,
)
from lit_prune.callbacks.capture import ActivationCaptureCallback, check_output_path
from lit_prune.pruning.engine import DEFAULT_CRITERION, PruneSpec, make_plan
from lit_prune.pruning.plan import CHECKPOINT_KEY, PrunePlan, read_checkpoint_plan
from lit_prune.pruning.stats import NeuronStats, model_fingerprint

__all__ = ["SelectivityPruneCallback"]

log = logging.getLogger(__name__)


class SelectivityPruneCallback(Callback):
    """Prune a fixed fraction of every decoder MLP's neurons, chosen by a criterion on captured statistics."""

    def __init__(
        self,
        ratio: float,
        criterion: str | None = None,
        multiple_of: int = 128,
        seed: int = 42,
        aggregation: str = "token",
        capture: str = "response",
        refit: bool | None = None,
        damping: float = 0.01,
        obs_group: int = 32,
        plan_path: str | None = None,
        stats_path: str | None = None,
        mode: str | None = None,
    ) -> None:
        """
        Args:
            ratio: Nominal fraction of MLP neurons to remove, in (0, 1).
            criterion: One of :data:`lit_prune.pruning.CRITERIA` (default ``compensated``; ``selective`` is the
                paper's).
            multiple_of: The kept width is a multiple of this (128 as in the paper; 1 turns it off).
            seed: Seed of ``random``.
            aggregation: ``token`` or ``prompt`` (the paper), for the mean-based criteria.
            capture: ``response`` (prompt + reference response) or ``prompt`` (the paper).
            refit: Re-fit ``W_down`` on the target Gram matrix (None: the criterion's default).
            damping: Relative damping of the Gram matrix.
            obs_group: Neurons ``compensated`` removes between updates.
            plan_path: Also write the plan as JSON here (a folder gets ``prune_plan.json``).
            stats_path: Statistics file to plan from when no ActivationCaptureCallback is present; it must have
                been captured on this model's weights.
            mode: Deprecated name of ``criterion``.

        Raises:
            ValueError: For any setting outside its range (see :class:`PruneSpec`) or an unwritable ``plan_path``.
        """
        super().__init__()
        if mode is not None:
            if criterion is not None and criterion != mode:
                raise ValueError(f"`mode`={mode!r} (deprecated) and `criterion`={criterion!r} disagree; give `criterion`")
            rank_zero_warn("`SelectivityPruneCallback(mode=...)` is deprecated; use `criterion=`")
            criterion = mode
        self.spec = PruneSpec(ratio, criterion or DEFAULT_CRITERION, multiple_of, seed, aggregation, capture, refit,
                              damping, obs_group)
        check_output_path("plan_path", plan_path, directory_ok=True)
        if stats_path is not None and Path(stats_path).is_dir():
            raise ValueError(f"`stats_path`={stats_path!r} is a directory; give the statistics file")
        self.plan_path = plan_path
        self.stats_path = stats_path
        self.plan: PrunePlan | None = None
        self.seconds: dict = {}

    @property
    def ratio(self) -> float:
        return self.spec.ratio

    @property
    def criterion(self) -> str:
        return self.spec.criterion

    @property
    def multiple_of(self) -> int:
        return self.spec.multiple_of

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("validate", "predict"):
            return
        self.prune(trainer, pl_module)

    def _statistics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NeuronStats:
        for callback in trainer.callbacks:
            if isinstance(callback, ActivationCaptureCallback):
                stats = callback.ensure_stats(trainer, pl_module)
                if stats is not None:
                    return stats
        if self.stats_path and Path(self.stats_path).is_file():
            stats = NeuronStats.load(self.stats_path)
            model = find_causal_lm(pl_module)
            stats.check_compatible(model)
            stored = stats.metadata.get("model_fingerprint")
            if stored != model_fingerprint(model):
                raise ValueError(
                    f"`stats_path`={self.stats_path!r} holds statistics of other weights ("
                    f"{stats.metadata.get('model', 'unknown model')!r}, fingerprint {str(stored)[:12]}...) than the "
                    "model being pruned; capture them on this model (add an ActivationCaptureCallback with this "
                    "`stats_path`: it recaptures and overwrites a stale file)"
                )
            return stats
        raise ValueError("SelectivityPruneCallback found no statistics: add an ActivationCaptureCallback to the "
                         f"Trainer or pass `stats_path` to an existing statistics file (got {self.stats_path!r})")

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> PrunePlan:
        """Slice the model once: replay the resume checkpoint's plan, or plan from statistics."""
        model = find_causal_lm(pl_module)
        if self.plan is not None and applied_plan(pl_module) is self.plan and self.plan.is_applied(model):
            return self.plan
        check_not_pruned_elsewhere(trainer, pl_module)
        plan = resume_plan(trainer)
        if plan is not None:
            plan.apply(model, shapes_only=True)  # the checkpoint's weights load next
            rank_zero_info(f"resuming: replaying the checkpoint's prune plan ({plan.label}, kept width "
                           f"{plan.kept_width}) without capturing")
        else:
            self.spec.check_model(model)
            stats = self._statistics(trainer, pl_module)
            result = make_plan(model, stats, self.spec)
            result.apply(model)
            plan, self.seconds = result.plan, result.seconds
        self.plan = plan
        if hasattr(pl_module, "set_prune_plan"):
            pl_module.set_prune_plan(plan)
        else:
            pl_module.prune_plan = plan
        if self.plan_path and trainer.is_global_zero:
            plan.save(self.plan_path)
        rank_zero_info(f"pruned {plan.label}: MLP width {plan.original_width} -> {plan.kept_width} in "
                       f"{plan.num_layers} layers (nominal {plan.ratio:.2%}, exact {plan.exact_ratio:.2%})")
        return plan

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # The one writer. Top-level key, so a resumed run can read the plan in `setup`, before any weights load.
        if self.plan is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["plan"] = self.plan.to_dict()

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # After the weights loaded: a run resumed by `trainer.fit(ckpt_path=...)` (which Lightning does not show to
        # `setup`) planned afresh; its plan must be the checkpoint's, or the loaded weights sit on other neurons.
        saved = read_checkpoint_plan(checkpoint)
        if saved is not None and self.plan is not None and saved.kept_indices != self.plan.kept_indices:
            raise ValueError(
                f"the checkpoint's prune plan ({saved.label}, kept width {saved.kept_width}) differs from the one this "
                f"run made ({self.plan.label}, kept width {self.plan.kept_width}); set `trainer.ckpt_path` before "
                "`trainer.fit` (or use `python -m lit_prune fit --ckpt_path`) so the stored plan is replayed"
            )
