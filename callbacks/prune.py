"""SelectivityPruneCallback: score neurons, plan the kept width and physically slice the MLPs.

Runs in ``setup`` after :class:`ActivationCaptureCallback` has statistics and before
``configure_model`` (LoRA) and the optimizer. When the run resumes from a checkpoint that holds a plan,
it replays that plan instead, so the weights about to load fit the model's shapes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_prune.callbacks._utils import CHECKPOINT_KEY, applied_plan, find_causal_lm, resume_plan
from lit_prune.callbacks.capture import ActivationCaptureCallback
from lit_prune.pruning.importance import CRITERIA
from lit_prune.pruning.plan import PrunePlan, kept_width, make_plan, validate_ratio
from lit_prune.pruning.stats import NeuronStats

__all__ = ["SelectivityPruneCallback"]

log = logging.getLogger(__name__)


class SelectivityPruneCallback(Callback):
    """Prune a fixed fraction of every decoder MLP's neurons, chosen by a criterion on captured statistics."""

    def __init__(
        self,
        ratio: float,
        mode: str = "selective",
        multiple_of: int = 128,
        seed: int = 42,
        plan_path: str | None = None,
        stats_path: str | None = None,
    ) -> None:
        """
        Args:
            ratio: Nominal fraction of MLP neurons to remove, in (0, 1).
            mode: Criterion: ``selective`` (the paper), ``reverse``, ``random`` or ``target_mean``.
            multiple_of: The kept width is a multiple of this (128 as in the paper; 1 turns it off).
            seed: Seed of ``random``.
            plan_path: Also write the plan as JSON here.
            stats_path: Statistics file to plan from when no ActivationCaptureCallback is present.

        Raises:
            ValueError: For ``ratio`` outside (0, 1), ``multiple_of`` < 1 or an unknown ``mode``.
        """
        super().__init__()
        self.ratio = validate_ratio(ratio)
        if mode not in CRITERIA:
            raise ValueError(f"`mode` must be one of {CRITERIA}; got {mode!r}")
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
            raise ValueError(f"`multiple_of` must be an integer >= 1; got {multiple_of!r}")
        self.mode = mode
        self.multiple_of = multiple_of
        self.seed = seed
        self.plan_path = plan_path
        self.stats_path = stats_path
        self.plan: PrunePlan | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.prune(trainer, pl_module)

    def _statistics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> NeuronStats:
        for callback in trainer.callbacks:
            if isinstance(callback, ActivationCaptureCallback):
                stats = callback.ensure_stats(trainer, pl_module)
                if stats is not None:
                    return stats
        if self.stats_path and Path(self.stats_path).is_file():
            return NeuronStats.load(self.stats_path)
        raise ValueError("SelectivityPruneCallback found no statistics: add an ActivationCaptureCallback to the "
                         "Trainer or pass `stats_path` to an existing statistics file")

    def prune(self, trainer: L.Trainer, pl_module: L.LightningModule) -> PrunePlan | None:
        """Slice the model once: replay the resume checkpoint's plan, or plan from statistics."""
        model = find_causal_lm(pl_module)
        existing = applied_plan(pl_module) or self.plan
        if existing is not None and existing.is_applied(model):
            return existing
        plan = resume_plan(trainer)
        if plan is not None:
            rank_zero_info(f"resuming: replaying the checkpoint's prune plan ({plan.mode}, kept width "
                           f"{plan.kept_width}) without capturing")
        else:
            stats = self._statistics(trainer, pl_module)
            stats.check_compatible(model)
            kept_width(stats.width, self.ratio, self.multiple_of)  # fail early with the argument's name
            plan = make_plan(stats, self.ratio, self.mode, self.multiple_of, self.seed)
        plan.apply(model)
        self.plan = plan
        if hasattr(pl_module, "set_prune_plan"):
            pl_module.set_prune_plan(plan)
        else:
            pl_module.prune_plan = plan
        if self.plan_path and trainer.is_global_zero:
            plan.save(self.plan_path)
        rank_zero_info(f"pruned {plan.mode}: MLP width {plan.original_width} -> {plan.kept_width} in "
                       f"{plan.num_layers} layers (nominal {plan.ratio:.2%}, exact {plan.exact_ratio:.2%})")
        return plan

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Top-level key so that a resumed run can read the plan in `setup`, before any weights load.
        if self.plan is not None:
            checkpoint.setdefault(CHECKPOINT_KEY, {})["plan"] = self.plan.to_dict()

    @override
    def state_dict(self) -> dict:
        return {"plan": self.plan.to_dict() if self.plan else None}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("plan") and self.plan is None:
            self.plan = PrunePlan.from_dict(state_dict["plan"])
