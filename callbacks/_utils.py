"""Helpers shared by the pruning callbacks: find the Hugging Face model and tokenizer, resume state."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lit_prune.pruning.plan import PrunePlan, read_checkpoint_plan

log = logging.getLogger(__name__)


def find_causal_lm(pl_module: L.LightningModule) -> nn.Module:
    """The Hugging Face causal LM inside ``pl_module``: its ``model`` attribute, else the first submodule
    with a ``config`` and ``generate`` (a ``PreTrainedModel``).

    Raises:
        ValueError: If the LightningModule holds no such model.
    """
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    for module in pl_module.modules():
        if module is not pl_module and hasattr(module, "config") and hasattr(module, "generate"):
            return module
    raise ValueError(
        f"{type(pl_module).__name__} holds no Hugging Face causal LM: give it a `model` attribute with the "
        "`transformers` model (a PreTrainedModel)"
    )


def find_tokenizer(pl_module: L.LightningModule, explicit=None):
    """``explicit`` if given, else ``pl_module.tokenizer``; the pad token defaults to EOS.

    Raises:
        ValueError: If neither is available.
    """
    tokenizer = explicit if explicit is not None else getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"no tokenizer: pass `tokenizer=` to the callback or give {type(pl_module).__name__} a "
                         "`tokenizer` attribute")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def applied_plan(pl_module: L.LightningModule) -> PrunePlan | None:
    """The plan already applied to the module (``pl_module.prune_plan``), if any."""
    return getattr(pl_module, "prune_plan", None)


def resume_plan(trainer: L.Trainer) -> PrunePlan | None:
    """The plan stored in the checkpoint the Trainer is about to resume from, if any.

    Lightning only tells callbacks about the checkpoint during ``setup`` when it was set with
    ``trainer.ckpt_path = path`` before ``trainer.fit`` (the lit_prune CLI does this for ``--ckpt_path``).
    """
    path = trainer.ckpt_path
    if not path or not Path(path).is_file():
        return None
    return read_checkpoint_plan(torch.load(path, map_location="cpu", mmap=True, weights_only=False))


def prune_callbacks(trainer: L.Trainer) -> list:
    """The Trainer's width-pruning callbacks (``SelectivityPruneCallback``), in order."""
    from lit_prune.callbacks.prune import SelectivityPruneCallback

    return [c for c in trainer.callbacks if isinstance(c, SelectivityPruneCallback)]


def check_not_pruned_elsewhere(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise if the model arrived pruned (e.g. a lit_prune export) and a prune callback would prune it again.

    A plan that one of this Trainer's prune callbacks applied (the demo tests, then fits, the same module) is
    fine; a plan loaded with the model is not: pruning a pruned model again by another ratio would silently do
    nothing (its statistics are of the narrower model, its plan of the wider one).

    Raises:
        ValueError: Naming the model's plan and the two ways out.
    """
    plan = applied_plan(pl_module)
    callbacks = prune_callbacks(trainer)
    if plan is None or not callbacks or any(c.plan is plan for c in callbacks):
        return
    source = getattr(pl_module, "model_name_or_path", None) or type(pl_module).__name__
    raise ValueError(
        f"model {source!r} is already pruned ({plan.label}, kept width {plan.kept_width} of {plan.original_width}, "
        f"prune_plan.json) and the Trainer has a SelectivityPruneCallback that would prune it again. For LoRA "
        "recovery of the pruned model, remove the pruning callbacks (`--trainer.callbacks null`); to prune by "
        "another ratio, start from the dense model "
        f"{plan.provenance.get('model', '(the plan names no source model)')!r}"
    )
