"""Helpers shared by the pruning callbacks: find the Hugging Face model and tokenizer, resume state."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


def resume_checkpoint(trainer: L.Trainer) -> dict | None:
    """The checkpoint the Trainer is about to resume from (memory-mapped), if any.

    Lightning only tells callbacks about the checkpoint during ``setup`` when it was set with
    ``trainer.ckpt_path = path`` before ``trainer.fit`` (``LitPruneTrainer.fit`` does this for its ``ckpt_path``).
    """
    path = trainer.ckpt_path
    if not path or not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def resume_plan(trainer: L.Trainer) -> PrunePlan | None:
    """The width plan stored in the checkpoint the Trainer is about to resume from, if any."""
    checkpoint = resume_checkpoint(trainer)
    return None if checkpoint is None else read_checkpoint_plan(checkpoint)


Text = tuple[str, "str | None"]


def rank_sum(trainer: L.Trainer):
    """A ``reduce`` for the pruning library: sums a tensor over the Trainer's processes (identity on one)."""
    if trainer.world_size == 1:
        return lambda tensor: tensor
    return lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum")


def check_sizes(**sizes) -> None:
    """Raise unless every keyword (``batch_size=8, max_length=512``) is an integer >= 1.

    Raises:
        ValueError: Naming the first argument that is not, and its value.
    """
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}")


def text_list(name: str, values: Sequence[str] | None) -> list[str] | None:
    """``values`` as a list of strings (None stays None).

    Raises:
        ValueError: For one string instead of a list (it would be read one character per text), an empty list or
            items that are not strings, naming the argument.
    """
    if values is None:
        return None
    if isinstance(values, str):
        raise ValueError(f"`{name}` must be a list of strings, not one string ({values[:40]!r}); wrap it in a list")
    values = list(values)
    if not values:
        raise ValueError(f"`{name}` is empty; give at least one text, or None to use the datamodule")
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise ValueError(f"`{name}` must hold strings; got {sorted(set(bad))}")
    return values


def text_pairs(group: str, prompts: Sequence[str] | None, responses: Sequence[str] | None) -> list[Text] | None:
    """Checked ``(prompt, response or None)`` pairs of a callback's ``<group>_prompts`` / ``<group>_responses``.

    Raises:
        ValueError: See :func:`text_list`; or responses without prompts or of another length.
    """
    prompts = text_list(f"{group}_prompts", prompts)
    responses = text_list(f"{group}_responses", responses)
    if responses is not None and (prompts is None or len(responses) != len(prompts)):
        raise ValueError(f"`{group}_responses` must have one response per `{group}_prompts` entry; got "
                         f"{len(responses)} responses for {0 if prompts is None else len(prompts)} prompts")
    return None if prompts is None else list(zip(prompts, responses or [None] * len(prompts)))


def datamodule_texts(trainer: L.Trainer, tokenizer) -> dict[str, list[Text]] | None:
    """The datamodule's ``capture_texts(tokenizer)`` (or its ``capture_prompts`` without responses), or None."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "capture_texts"):
        return datamodule.capture_texts(tokenizer)
    if datamodule is not None and hasattr(datamodule, "capture_prompts"):
        return {g: [(p, None) for p in ps] for g, ps in datamodule.capture_prompts(tokenizer).items()}
    return None


def prune_callbacks(trainer: L.Trainer) -> list:
    """The Trainer's width-pruning callbacks (``SelectivityPruneCallback``), in order."""
    from lit_prune.callbacks.prune import SelectivityPruneCallback

    return [c for c in trainer.callbacks if isinstance(c, SelectivityPruneCallback)]


def check_depth_first(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise if a ``DepthPruneCallback`` of this Trainer has not removed its blocks from ``pl_module`` yet.

    Width statistics, plans and masks index the decoder layers, so they must be made on the blocks that remain:
    the depth callback comes first in ``trainer.callbacks``. Called before any width capture.

    Args:
        trainer: The Trainer whose callbacks are checked.
        pl_module: The module being pruned (it records the applied plan as ``depth_plan``).

    Raises:
        ValueError: Saying to list DepthPruneCallback first.
    """
    from lit_prune.callbacks.depth import DepthPruneCallback

    applied = getattr(pl_module, "depth_plan", None)
    if any(isinstance(c, DepthPruneCallback) and (c.plan is None or c.plan is not applied) for c in trainer.callbacks):
        raise ValueError("a DepthPruneCallback comes after the width callbacks in `trainer.callbacks`: width "
                         "statistics and plans must be made on the blocks that remain; list DepthPruneCallback "
                         "before ActivationCaptureCallback and SelectivityPruneCallback")


def check_not_pruned_elsewhere(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Raise if the model arrived pruned (e.g. a lit_prune export) and a prune callback would prune it again, or
    a depth callback has yet to remove its blocks (:func:`check_depth_first`).

    A plan that one of this Trainer's prune callbacks applied (the demo tests, then fits, the same module) is
    fine; a plan loaded with the model is not: pruning a pruned model again by another ratio would silently do
    nothing (its statistics are of the narrower model, its plan of the wider one).

    Raises:
        ValueError: Naming the model's plan and the two ways out.
    """
    check_depth_first(trainer, pl_module)
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
